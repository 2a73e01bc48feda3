"""forward: forward the message on standard input (forward(1), qmail's forward.c).

    forward address ...

Meant for .qmail files: the envelope sender is $NEWSENDER, and $DTLINE (the
Delivered-To: line qmail-local sets) goes before the message, which is
otherwise passed on untouched, as are the addresses. Exit 0 with
`forward: qp N` on stderr; 100 when NEWSENDER or DTLINE is missing or the
smart host refuses the message for good; 111 otherwise. Unlike qmail's,
no address at all is a usage error (100): qmail would queue a message
with no recipients, which the smart host refuses anyway.
"""

from __future__ import annotations

import os
import sys
from typing import BinaryIO, cast

import miniqmail
from miniqmail.handoff import handoff
from miniqmail.headers import Message
from miniqmail.progmain import fatal, run

PROG = "forward"


def forward(argv: list[str]) -> int:
    sender = os.environb.get(b"NEWSENDER")
    if sender is None:
        return fatal(PROG, "NEWSENDER not set", 100)
    dtline = os.environb.get(b"DTLINE")
    if dtline is None:
        return fatal(PROG, "DTLINE not set", 100)
    if not argv:
        return fatal(PROG, "usage: forward address ...", 100)
    if sys.stdin is None:
        return fatal(PROG, "unable to read message: no standard input", 111)
    message = Message(dtline, sys.stdin.buffer, fix_eol=False)
    result = handoff(cast(BinaryIO, message), os.fsdecode(sender), list(argv), root=miniqmail.root())
    if not result.ok:
        return fatal(PROG, result.text[1:], 100 if result.permanent else 111)
    try:
        sys.stderr.write(f"forward: qp {os.getpid()}\n")
    except (AttributeError, OSError, ValueError):
        pass
    return 0


def main() -> None:
    run(PROG, lambda: forward(sys.argv[1:]))


if __name__ == "__main__":
    main()
