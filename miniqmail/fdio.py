"""Two small habits of every program here: write all of a buffer to a descriptor,
and name an OSError the way a one-line error wants it."""

from __future__ import annotations

import os


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until everything is written (a pipe or a signal may take less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def why(err: OSError) -> str:
    """The system's words for an OSError, without Python's `[Errno N]` prefix."""
    return err.strerror or str(err)
