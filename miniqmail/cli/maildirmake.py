"""maildirmake: create an empty Maildir (maildirmake(1), qmail's maildirmake.c).

    maildirmake dir

Makes dir, dir/tmp, dir/new and dir/cur, each mode 0700 (umask 077, as
qmail does). No argument: usage, exit 100. Any failure, including an
existing dir: `maildirmake: fatal: ...`, exit 111.
"""

from __future__ import annotations

import os
import sys

from miniqmail.maildir import make
from miniqmail.progmain import fatal, run

PROG = "maildirmake"


def maildirmake(argv: list[str]) -> int:
    if not argv or not argv[0]:
        sys.stderr.write(f"{PROG}: usage: maildirmake name\n")
        return 100
    path = argv[0]
    os.umask(0o077)
    try:
        make(path, 0o700)
    except OSError as e:
        where = e.filename if isinstance(e.filename, str) else path
        return fatal(PROG, f"unable to mkdir {where}: {e.strerror or e}", 111)
    return 0


def main() -> None:
    run(PROG, lambda: maildirmake(sys.argv[1:]))


if __name__ == "__main__":
    main()
