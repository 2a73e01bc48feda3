"""qmail-qmqpd: receive one message by QMQP on stdin, answer on stdout (qmail-qmqpd(8), qmail-qmqpd.c).

Runs under tcpserver, as qmail's does:

    tcpserver -x /var/qmail/rules/qmqp.cdb -u QMAILD -g NOFILES 0 628 qmail-qmqpd

One request per connection; the message streams into a draft in
$SMARTHOST_ROOT/queue as it arrives; the answer is `Kok <time> qp <pid>`, or the
Z/D text for the queue's trouble or a refused request. A protocol error ends
the program with exit 100 and no answer, a request over 200,000,000 bytes with
exit 111, the client closing early with exit 0 and nothing queued; the whole
session is limited to an hour (exit 111). DATABYTES, when set, bounds the
request (qmail-qmqpd has no such limit). Prints nothing else.

Access control is tcpserver's (-x rules); there is no relay check: whoever
may connect may relay anywhere.
"""

from __future__ import annotations

import os
import signal
from typing import Mapping

from miniqmail.fdio import write_all
from smarthost.qmqp_session import (NEED_DATA, Event, SESSION_MAX, QmqpError, QmqpSession, QueueSink,
                                    Request, Refused, answer, databytes, received)
from smarthost.queue import Queue, received_line
from smarthost.root import Root

CHUNK = 65536


def header(environ: Mapping[str, str], pid: int) -> bytes:
    """qmail-queue's line, then qmail-qmqpd's own, both as qmail writes them."""
    local = environ.get("TCPLOCALHOST") or environ.get("TCPLOCALIP")
    return received_line("invoked from network", pid) + received(
        "QMQP", local, environ.get("TCPREMOTEIP"), environ.get("TCPREMOTEHOST"),
        environ.get("TCPREMOTEINFO"))


def serve(infd: int = 0, outfd: int = 1) -> int:
    root = Root.from_env()
    queue = Queue(root.queue_dir)
    sink = QueueSink(queue.draft, header(os.environ, os.getpid()))
    session = QmqpSession(sink.write, databytes(os.environ.get("DATABYTES")))
    try:
        event: Event = NEED_DATA
        while event is NEED_DATA:
            try:
                data = os.read(infd, CHUNK)
            except OSError:
                data = b""  # qmail-qmqpd's saferead(): a read error ends it like EOF
            event = session.feed(data) if data else session.feed_eof()
        assert isinstance(event, (Request, Refused))
        text = sink.finish(event)
    except QmqpError as e:
        return e.exit_code
    finally:
        sink.discard()
    try:
        write_all(outfd, answer(text))
    except OSError:
        pass  # the client went away; what is queued stays queued
    if sink.injected is not None:  # answered first: the client need not wait for the wake-up
        queue.poke((sink.injected.id,))
    return 0


def main() -> None:
    # qmail-qmqpd: alarm(3600) -> resources() -> exit 111, whatever it was doing.
    signal.signal(signal.SIGALRM, lambda *_: os._exit(111))
    signal.alarm(SESSION_MAX)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        code = serve()
    except BaseException:
        code = 111  # like qmail-qmqpd's resources(): no answer, the client retries
    os._exit(code)


if __name__ == "__main__":
    main()
