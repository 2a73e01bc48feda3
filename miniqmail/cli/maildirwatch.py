"""maildirwatch: look for new mail in a Maildir (maildirwatch(1), qmail 1.03's maildirwatch.c).

    MAILDIR=$HOME/Maildir maildirwatch

On a terminal: clears the screen and lists every message in $MAILDIR/new
(see miniqmail.maildirsummary for the form), then lists them again whenever
new/ changes and at least every 30 seconds, until interrupted. Into a pipe or
file: one listing, without screen control codes, and exit 0. Like qmail's,
each pass also removes tmp/ files untouched for 36 hours. No $MAILDIR, or a
new/ that cannot be read: `maildirwatch: fatal: ...`, exit 111.
"""

from __future__ import annotations

import os
import sys
import time
from typing import BinaryIO

from miniqmail.maildirscan import ScanError, clean, scan
from miniqmail.maildirsummary import CLEAR, summarize
from miniqmail.progmain import fatal, run

PROG = "maildirwatch"
#: qmail's maildirwatch sleeps 30 seconds between listings.
REFRESH = 30.0
#: how often new/ is checked for a change in between.
POLL = 0.5


def listing(maildir: str, ansi: bool) -> bytes:
    """One screenful: every message of new/, oldest first. Raises ScanError."""
    clean(maildir)
    out = [CLEAR] if ansi else []
    for entry in scan(maildir, ("new",)):
        try:
            with open(entry.path, "rb") as message:
                out.append(summarize(message).render(ansi))
        except OSError:
            continue  # moved to cur/ or removed since the scan: not new any more
    return b"".join(out)


def _stamp(directory: str) -> tuple[int, int] | None:
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino


def _wait_for_change(directory: str, seen: tuple[int, int] | None) -> None:
    deadline = time.monotonic() + REFRESH
    while time.monotonic() < deadline:
        time.sleep(POLL)
        if _stamp(directory) != seen:
            return


def watch(maildir: str, out: BinaryIO, tty: bool) -> int:
    new = os.path.join(maildir, "new")
    while True:
        seen = _stamp(new)
        try:
            text = listing(maildir, tty)
        except ScanError as e:
            return fatal(PROG, str(e), 111)
        try:
            out.write(text)
            out.flush()
        except OSError as e:
            return fatal(PROG, f"unable to write: {e.strerror or e}", 111)
        if not tty:
            return 0
        _wait_for_change(new, seen)


def main_body() -> int:
    maildir = os.environ.get("MAILDIR")
    if not maildir:
        return fatal(PROG, "$MAILDIR is not set", 111)
    try:
        os.listdir(maildir)
    except OSError as e:
        return fatal(PROG, f"unable to chdir to {maildir}: {e.strerror or e}", 111)
    out = sys.stdout.buffer
    try:
        return watch(maildir, out, out.isatty())
    except KeyboardInterrupt:
        return 0  # the usual way to leave the terminal view


def main() -> None:
    run(PROG, main_body)


if __name__ == "__main__":
    main()
