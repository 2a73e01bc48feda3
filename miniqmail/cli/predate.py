"""predate: run a program with a local-time Date: field put before its input (qmail's predate.c).

    predate child [ arg ... ]

The child (found on $PATH) reads `Date: D Mon YYYY HH:MM:SS +hhmm`, in this
host's time zone, then everything predate reads; predate exits with the
child's exit code. No child: usage, 100; no pipe, no child started, or the
child killed by a signal: 111. UTC is written `+0000`, as qmail's predate
does (qmail-inject's own Date: uses `-0000`). The child is started with
posix_spawnp, not the subprocess module, to keep start-up small.
"""

from __future__ import annotations

import os
import signal
import sys

from miniqmail.datefmt import date822_local
from miniqmail.progmain import fatal, run

PROG = "predate"


def date_line(when: float | None = None) -> bytes:
    """The Date: field predate writes, newline included."""
    return f"Date: {date822_local(when)}\n".encode()


def _copy(out_fd: int) -> None:
    """The Date: line, then stdin, into the pipe; a child that stops reading just ends the copy."""
    try:
        os.write(out_fd, date_line())
        while True:
            chunk = os.read(0, 65536)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[os.write(out_fd, view):]
    except OSError:
        pass  # qmail's predate ignores these too; the child's exit code tells what happened


def predate(argv: list[str]) -> int:
    if not argv:
        try:
            sys.stderr.write("predate: usage: predate child\n")  # qmail's words: no "fatal"
        except (AttributeError, OSError, ValueError):
            pass
        return 100
    try:
        read_end, write_end = os.pipe()
    except OSError as e:
        return fatal(PROG, f"unable to create pipe: {e.strerror}", 111)
    try:
        pid = os.posix_spawnp(argv[0], argv, os.environ,
                              file_actions=[(os.POSIX_SPAWN_DUP2, read_end, 0),
                                            (os.POSIX_SPAWN_CLOSE, write_end)],
                              setsigdef=(signal.SIGPIPE,))
    except OSError as e:
        os.close(write_end)
        return fatal(PROG, f"unable to run {argv[0]}: {e.strerror}", 111)
    finally:
        os.close(read_end)
    _copy(write_end)
    os.close(write_end)
    try:
        _, status = os.waitpid(pid, 0)
    except OSError as e:
        return fatal(PROG, f"wait failed: {e.strerror}", 111)
    if os.WIFSIGNALED(status):
        return fatal(PROG, "child crashed", 111)
    return os.WEXITSTATUS(status)


def main() -> None:
    run(PROG, lambda: predate(sys.argv[1:]))


if __name__ == "__main__":
    main()
