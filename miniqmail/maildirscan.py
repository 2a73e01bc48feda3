"""Reading a Maildir the way maildir2mbox(1) and maildirwatch(1) do (qmail's maildir.c).

`clean` removes files in tmp/ nobody has touched for 36 hours, as maildir(5)
allows any reader to. `scan` lists the messages of new/ (and cur/), oldest
modification time first, skipping names that start with a dot; like qmail
it can leave out messages modified in the current second, so that a message
delivered while the scan runs cannot be ordered before an older one.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from typing import Iterable

from miniqmail.fdio import why

#: maildir(5): a tmp/ file not accessed for 36 hours may be removed.
TMP_MAX_AGE = 36 * 3600


class ScanError(OSError):
    """A Maildir directory could not be listed."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.message = message
        self.filename = path

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, order=True)
class Entry:
    """One message file; entries sort by modification time, then name."""

    mtime_ns: int
    name: str
    path: str

    @property
    def mtime(self) -> int:
        """Whole seconds, as qmail's From_ line and ordering use them."""
        return self.mtime_ns // 1_000_000_000


def clean(maildir: str, now: float | None = None) -> int:
    """Remove tmp/ files last accessed over 36 hours ago; return how many went. Errors are ignored."""
    now = time.time() if now is None else now
    tmp = os.path.join(maildir, "tmp")
    removed = 0
    try:
        names = os.listdir(tmp)
    except OSError:
        return 0
    for name in names:
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_atime + TMP_MAX_AGE < now:
                os.unlink(path)
                removed += 1
        except OSError:
            pass  # gone already, or not ours to remove: the next reader tries again
    return removed


def scan(maildir: str, subdirs: Iterable[str] = ("new", "cur"),
         before: float | None = None) -> list[Entry]:
    """The regular files of `subdirs`, oldest first; with `before`, only those modified earlier.

    Raises ScanError when a subdirectory cannot be listed. A file that
    vanishes between listing and stat (a reader moved it) is left out.
    """
    limit = None if before is None else int(before) * 1_000_000_000
    entries = []
    for sub in subdirs:
        directory = os.path.join(maildir, sub)
        try:
            names = os.listdir(directory)
        except OSError as e:
            raise ScanError(f"unable to scan {directory}: {why(e)}", directory) from None
        for name in names:
            if name.startswith("."):
                continue
            path = os.path.join(directory, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if limit is not None and st.st_mtime_ns >= limit:
                continue  # modified this second: its place in the order is not settled yet
            entries.append(Entry(st.st_mtime_ns, name, path))
    entries.sort()
    return entries
