"""mailsubj: send standard input with a subject (mailsubj(1), qmail's mailsubj.sh).

    mailsubj subject recipient ...

Puts `Subject: subject`, `To: recipients` (joined by spaces) and an empty
line before standard input and gives that to plain qmail-inject, in this
process. As in qmail the caller must quote: the recipients go into To:
as they are, and qmail-inject reads them from there. No arguments at all is
a usage error (100); the shell script would fail in `shift`. Unlike
`echo` in some shells, backslashes in the subject are kept as they are.
"""

from __future__ import annotations

import io
import sys

import miniqmail
from miniqmail.cli.qmail_inject import latin
from miniqmail.headers import Message
from miniqmail.inject import Options, environment, inject
from miniqmail.progmain import fatal, run

PROG = "mailsubj"


def mailsubj(argv: list[str]) -> int:
    if not argv:
        return fatal(PROG, "usage: mailsubj subject recipient ...", 100)
    subject, recipients = latin(argv[0]), [latin(a) for a in argv[1:]]
    head = f"Subject: {subject}\nTo: {' '.join(recipients)}\n\n".encode("latin-1")
    stdin = sys.stdin.buffer if sys.stdin is not None else None
    message = io.BufferedReader(Message(head, stdin, fix_eol=False))
    stdout = sys.stdout.buffer if sys.stdout is not None else None
    return inject(message, stdout, Options(), environment(), miniqmail.root())


def main() -> None:
    run(PROG, lambda: mailsubj(sys.argv[1:]))


if __name__ == "__main__":
    main()
