"""`smarthost run`: qmail-send's scheduler and the QMQP listeners (qmail-qmqpd under tcpserver) in one loop.

The listeners start first, so a port that cannot be bound stops the daemon
before anything else runs; each logs `qmqpd: listening on ADDR:PORT` with the
port actually bound. SIGTERM (handled by the scheduler) closes the listeners at
once, lets the deliveries under way finish, then gives QMQP sessions under way
a few seconds to end before cutting them off: a message not yet acknowledged
is not queued, and its client tries again.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Iterable

from smarthost.qmqpd_server import QmqpListener
from smarthost.root import Root
from smarthost.send import Log, Scheduler

#: seconds QMQP sessions under way get after SIGTERM
STOP_GRACE = 5.0


def parse_listen(text: str) -> tuple[str, int]:
    """`ADDR:PORT` or `[IPV6]:PORT` as (host, port); ValueError if it is neither."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not ADDR:PORT")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if (version == 6) != bracketed:
        raise ValueError(f"{text!r}: write an IPv6 address as [ADDR]:PORT, an IPv4 one as ADDR:PORT")
    return host, int(port)


async def serve(root: Root, log: Log, qmqp: Iterable[tuple[str, int]] = ()) -> None:
    """Run until SIGTERM: the listeners for `qmqp` addresses, and the scheduler."""
    def say(line: str) -> None:
        # Listener lines go out at once, not with the scheduler's next turn.
        log(line)
        log.flush()

    scheduler = Scheduler(root, log)
    listeners: list[QmqpListener] = []
    try:
        for host, port in qmqp:
            listener = QmqpListener(root, host, port, log=say)
            await listener.start()
            listeners.append(listener)
            scheduler.on_stop.append(listener.close)
            say(f"qmqpd: listening on {listener.address}")
        await scheduler.run()
    finally:
        for listener in listeners:
            await listener.wait_closed(STOP_GRACE)


def run(root: Root, log: Log, qmqp: Iterable[tuple[str, int]] = ()) -> None:
    asyncio.run(serve(root, log, list(qmqp)))
