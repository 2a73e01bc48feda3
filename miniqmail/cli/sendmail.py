"""sendmail: the Sendmail-compatible front end (qmail's sendmail.c; no man page of its own).

    sendmail [ -t ] [ -f sender ] [ -F name ] [ -i ] [ -oX ] [ -bp ] [ -bs ] [ arg ... ]

A flag translator, as in qmail, but running qmail-inject's code in this
process: `-a` (or `-H` with `-t`: header recipients *and* the arguments),
`-f` passed on. Taken and ignored: -i -v -x -m, -oX, -e/-p/-B with their
argument, -E/-J with attached text, -bm. `-bp` (or the name `mailq`) says
this host keeps no queue; `-bs` runs an SMTP session on stdin/stdout
(miniqmail.smtp_stdio). Anything else, `-r -N -q -I -bi -bv...` included,
is one line and exit 100; the name `newaliases` is refused like qmail's.

Differences from qmail's sendmail, chosen for the callers it serves:
  * `-f` sets QMAILUSER/QMAILHOST and drops the inherited names, as netqmail
    1.04 and notqmail do (From: follows the envelope sender), but a name
    given with `-F` on the same command line is kept (cron's `-FCronDaemon
    -f root`); an empty or `<>` sender leaves From: alone;
  * CR LF line ends in the message become LF (PHP's mail() sends CR LF
    headers; Postfix's sendmail does the same conversion);
  * qmail-inject's errors keep qmail-inject's name, as they do under qmail.
"""

from __future__ import annotations

import os
import sys
from typing import BinaryIO

import miniqmail
from miniqmail.cli.qmail_inject import Getopt, GetoptError, latin, usage_error
from miniqmail.inject import Options, environment, inject
from miniqmail.progmain import fatal, run

PROG = "sendmail"
USAGE = "usage: sendmail [ -t ] [ -fsender ] [ -Fname ] [ -bp ] [ -bs ] [ arg ... ]"
#: sendmail.c's getopt string; `;` marks -E and -J, which swallow the rest of their word.
SPEC = "vimte:f:p:o:B:F:E;J;xb:"
NO_QUEUE = ("this host keeps no mail queue: mini-qmail hands each message to the smart host "
            "in control/qmqpservers at once")


def mailq(stdout: BinaryIO | None) -> int:
    if stdout is not None:
        stdout.write(NO_QUEUE.encode() + b"\n")
        stdout.flush()
    return 0


def smtp(stdin: BinaryIO | None, stdout: BinaryIO | None, root: str) -> int:
    if stdin is None or stdout is None:
        return fatal(PROG, "-bs needs standard input and output", 111)
    from miniqmail import smtp_stdio  # only -bs needs it

    return smtp_stdio.serve(stdin, stdout, root)


def sender_identity(env: dict[str, str], sender: str, name: str | None) -> None:
    """netqmail's do_sender(): From: follows `-f`; here a `-F` name survives it."""
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1]
    if not sender:
        return
    for var in ("QMAILNAME", "MAILNAME", "NAME", "QMAILHOST", "MAILHOST"):
        env.pop(var, None)
    user, at, host = sender.rpartition("@")
    if at:
        env["QMAILUSER"], env["QMAILHOST"] = user, host
    else:
        env["QMAILUSER"] = sender
    if name is not None:
        env["MAILNAME"] = name


def sendmail(prog: str, argv: list[str], stdin: BinaryIO | None, stdout: BinaryIO | None,
             env: dict[str, str], root: str) -> int:
    """The whole program; `prog` is the name it was called by (sendmail, mailq, newaliases)."""
    headers_too = False
    sender: str | None = None
    name: str | None = None
    getopt = Getopt(argv, SPEC)
    try:
        for opt, value in getopt:
            if opt == "t":
                headers_too = True
            elif opt == "f":
                sender = latin(value)
            elif opt == "F":
                name = latin(value)
                env["MAILNAME"] = name
            elif opt == "b":
                if value[:1] == "p":
                    return mailq(stdout)
                if value[:1] == "s":
                    return smtp(stdin, stdout, root)
                if value[:1] != "m":
                    return usage_error(PROG, f"-b{value} is not supported; {USAGE}")
    except GetoptError as e:
        return usage_error(PROG, f"{e}; {USAGE}")
    if prog == "mailq":
        return mailq(stdout)
    if prog == "newaliases":
        return fatal(PROG, "please use fastforward/newaliases instead", 100)
    if sender is not None:
        sender_identity(env, sender, name)
    opts = Options("H" if headers_too else "a", True, sender, tuple(latin(a) for a in getopt.rest), crlf=True)
    return inject(stdin, stdout, opts, env, root)


def main_with(stdin: BinaryIO | None) -> None:
    """The program edge, reading the message from `stdin` (datemail hands in a prefixed one)."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else PROG
    if prog not in ("mailq", "newaliases"):
        prog = PROG
    stdout = sys.stdout.buffer if sys.stdout is not None else None
    run(PROG, lambda: sendmail(prog, sys.argv[1:], stdin, stdout, environment(), miniqmail.root()))


def main() -> None:
    main_with(sys.stdin.buffer if sys.stdin is not None else None)


if __name__ == "__main__":
    main()
