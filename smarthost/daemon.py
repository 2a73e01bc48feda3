"""`smarthost run`: qmail-send's scheduler and the QMQP listeners (qmail-qmqpd under tcpserver).

The QMQP ports are bound first, so a port that cannot be bound stops the daemon
before anything else runs; each logs `qmqpd: listening on ADDR:PORT` with the
port actually bound. Like tcpserver's children, QMQP processes accept on the
same sockets (one per core by default: one Python process cannot use two); they
only inject into the queue and poke its trigger. The scheduler runs in the
first process, whose loop no client's fsync should hold up: it accepts QMQP
itself only when one of the others is gone. SIGTERM (handled by the scheduler)
closes the listeners at once, lets the deliveries under way finish, then gives
QMQP sessions under way a few seconds to end before cutting them off: a message
not yet acknowledged is not queued, and its client tries again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
from typing import Iterable

from smarthost import evloop
from smarthost.qmqpd_server import QmqpListener
from smarthost.root import Root
from smarthost.logfmt import Log
from smarthost.remote import RemoteDelivery
from smarthost.send import Scheduler
from smarthost.sendqueue import Message

#: seconds QMQP sessions under way get after SIGTERM
STOP_GRACE = 5.0
#: how often the scheduler checks that its QMQP processes are still there
WATCH_INTERVAL = 1.0


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


async def serve(root: Root, log: Log, listeners: list[QmqpListener], workers: list[int]) -> None:
    """Run until SIGTERM: the scheduler, and the listeners' share of the connections."""
    relay = RemoteDelivery(root, log)

    async def remote(msg: Message, recipients: list[str], messpath: str) -> list[tuple[str, str]]:
        return await relay.deliver(msg.sender, recipients, messpath)

    scheduler = Scheduler(root, log, remote=remote)
    scheduler.on_hup_hooks.append(relay.reread)

    def stop_workers() -> None:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    async def take_over() -> None:
        """With QMQP processes, accept only once one of them is gone."""
        while workers and not scheduler.stopping:
            for pid in workers:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    log(f"alert: QMQP process {pid} is gone; the scheduler takes QMQP connections too")
                    for listener in listeners:
                        await listener.start()
                    return
            await asyncio.sleep(WATCH_INTERVAL)

    watcher = None
    try:
        for listener in listeners:
            if not workers:
                await listener.start()
            scheduler.on_stop.append(listener.close)
        scheduler.on_stop.append(stop_workers)
        if workers:
            watcher = asyncio.get_running_loop().create_task(take_over())
        await scheduler.run()
    finally:
        if watcher is not None:
            watcher.cancel()
        await relay.close()
        for listener in listeners:
            await listener.wait_closed(STOP_GRACE)
        stop_workers()
        for pid in workers:
            await asyncio.to_thread(_reap, pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


async def worker(listeners: list[QmqpListener]) -> None:
    """A worker process: the same listening sockets, its own event loop, no scheduler."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for sig in (signal.SIGHUP, signal.SIGALRM):
        # the scheduler's signals; sent to the whole process group they must not kill us
        loop.add_signal_handler(sig, lambda: None)
    for listener in listeners:
        await listener.start()
    parent = os.getppid()
    while not stop.is_set():
        # A daemon killed outright leaves no one to send SIGTERM: notice, and go.
        if os.getppid() != parent:
            break
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass
    for listener in listeners:
        await listener.wait_closed(STOP_GRACE)


def default_workers() -> int:
    """One QMQP process per core (at most 4): one interpreter cannot use two."""
    return max(1, min(4, os.cpu_count() or 1))


def run(root: Root, log: Log, qmqp: Iterable[tuple[str, int]] = (), workers: int | None = None) -> None:
    """Bind the QMQP ports, fork the QMQP processes, then run the scheduler."""
    # SIGHUP and SIGALRM can reach the whole process group (kill -HUP -PGID); until the
    # scheduler and the QMQP processes have their handlers, they must not kill anyone.
    for sig in (signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, signal.SIG_IGN)
    def say(line: str) -> None:
        # Listener lines go out at once, not with the scheduler's next turn.
        log(line)
        log.flush()

    addrs = list(qmqp)
    n = (workers or default_workers()) if addrs else 1
    listeners = []
    for host, port in addrs:
        # The limit is the daemon's: each process takes its share.
        listener = QmqpListener(root, host, port, log=say)
        listener.concurrency = max(1, -(-listener.concurrency // n))
        listener.bind()
        listeners.append(listener)
    pids = []
    for _ in range(n if addrs else 0):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                evloop.run(worker(listeners))
            except BaseException:
                code = 111
            finally:
                log.flush()
                os._exit(code)
        pids.append(pid)
    for listener in listeners:
        say(f"qmqpd: listening on {listener.address}")
        # Should the scheduler take QMQP over, its loop must not wait for a client's fsync.
        listener.inline_alone = False
    evloop.run(serve(root, log, listeners, pids))
