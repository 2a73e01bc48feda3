"""qmail-showctl: describe the client's control files (qmail-showctl(8), qmail's qmail-showctl.c).

    qmail-showctl

Reports on the root in $MINIQMAIL_ROOT (default /var/mini-qmail): each
control file the client reads, with its value or `(Default.)` and what it
means, then every other file of control/. Exit 0; 111 only when the root or
its control/ cannot be read (qmail's `Oops!` line on stdout, and the usual
`qmail-showctl: fatal:` line on stderr). A file that cannot be read, even
control/me (where qmail's stops with 111), gets `Oops! Trouble reading this
file.` on its own line and the report goes on. Unlike notqmail's it does not
look for the qmail users, which a mini-qmail host does not have.
"""

from __future__ import annotations

import sys

from miniqmail import root
from miniqmail.progmain import fatal, run
from miniqmail.showctl import report

PROG = "qmail-showctl"


def showctl() -> int:
    lines, code = report(root())
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()
    if code:
        reason = lines[-1].removeprefix("Oops! ").rstrip(".")
        return fatal(PROG, reason[:1].lower() + reason[1:], code)
    return 0


def main() -> None:
    run(PROG, showctl)


if __name__ == "__main__":
    main()
