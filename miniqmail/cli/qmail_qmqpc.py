"""qmail-qmqpc: hand one message to a QMQP server (qmail-qmqpc(8), qmail-qmqpc.c).

The qmail-queue(8) interface: the message on fd 0, the envelope on fd 1.
Like qmail-qmqpc it changes to the root directory (failing that, 61), reads
the control files (55), takes in the whole message (54), then the envelope
(91, or 11 for an address too long) -- all before any network activity --
and then tries the servers of control/qmqpservers in order. It prints
nothing: the exit code is the answer.
"""

from __future__ import annotations

import os
from contextlib import closing

import miniqmail
from miniqmail import envelope
from miniqmail.exitcodes import QQ
from miniqmail.handoff import HandoffError, qmqp, settings, spool


def qmqpc() -> int:
    try:
        os.chdir(miniqmail.root())
    except OSError:
        return QQ.HOME
    try:
        conf = settings(".")
        with open(0, "rb", buffering=0, closefd=False) as message, closing(spool(message)) as body:
            try:
                with open(1, "rb", buffering=4096, closefd=False) as env_in:
                    env = envelope.read(env_in)
            except envelope.EnvelopeError as e:
                return e.code
            except OSError:
                return QQ.READ
            return qmqp(body, env.sender, env.recipients, conf).code
    except HandoffError as e:
        return e.code
    except OSError:  # fd 0 not open at all
        return QQ.READ
    except MemoryError:
        return QQ.NOMEM


def main() -> None:
    try:
        code = int(qmqpc())
    except BaseException:  # the program's edge: never a traceback, only qmail-queue's "bug" code
        code = QQ.BUG
    # os._exit: fd 1 is the envelope, and may even be closed; there is nothing to flush.
    os._exit(code)


if __name__ == "__main__":
    main()
