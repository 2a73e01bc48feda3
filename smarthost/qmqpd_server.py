"""The daemon's QMQP listener: qmail-qmqpd(8) behind tcpserver(1)'s accept loop, in asyncio.

What tcpserver and qmail-qmqpd do as two programs and a fork per connection,
this does in the daemon's loop:
  * at most control/concurrencyqmqp sessions at once (default 40, tcpserver -c);
    further connections wait unaccepted in the listen backlog, as with -c;
  * the rules in ROOT/rules/qmqp.cdb (tcprules format), looked at for every
    connection and reopened when the file changes (tcpserver -x); a denied
    client is closed before a byte is read. With no cdb at all only 127.0.0.1
    and ::1 may connect: QMQP relays to anywhere, so an open QMQP port is an
    open relay. An unreadable cdb drops every connection, as tcpserver does;
  * DATABYTES set by a rule bounds the request, as the variable does for the
    stdio qmail-qmqpd under tcpserver; other variables are ignored;
  * qmail-qmqpd's hour for the whole session, plus an idle limit per read
    (control/timeoutqmqpd, default 1200 s) that qmail-qmqpd does not have;
  * the Received line of qmail-qmqpd with TCPREMOTEIP = the peer, TCPREMOTEHOST
    unknown (no DNS, tcpserver -H), LOCAL = control/me, else the local IP.
The scheduler is woken (lock/trigger) after the client has its answer, where
qmail-queue pokes before qmail-qmqpd answers: the wake-up may hand the
scheduler the CPU, and the client need not wait for that; sessions that commit
in the same turn of the loop share one poke.
The message streams into a queue draft; file writes run in worker threads and
commits in disk threads that commit together whatever finished meanwhile
(smarthost.committer), so the loop never waits for the disk. A session alone in
its process does it all itself. One log line per connection: ok, refused (the
Z/D text), deny, or drop (and why).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import threading
from typing import Callable

from smarthost.cdb import CdbError
from smarthost.committer import Committer
from smarthost.logfmt import safe
from smarthost.qmqp_session import (NEED_DATA, Event, SESSION_MAX, QmqpError, QmqpSession, QueueSink,
                                    Refused, Request, Truncated, answer, databytes, received)
from smarthost.queue import Draft, Queue, received_line
from smarthost.root import Root
from smarthost.tcprules import Decision, RulesWatcher, match, normalize_ip

CONCURRENCY_DEFAULT = 40
#: seconds an unused spare draft is kept (see QmqpListener._take_draft)
SPARE_IDLE = 1.0
TIMEOUT_DEFAULT = 1200
BACKLOG = 128
CHUNK = 65536
RULES_CDB = "qmqp.cdb"
#: who may connect when there is no rules cdb at all
LOCALHOST = frozenset({"127.0.0.1", "::1"})


def localhost_only(ip: str) -> Decision:
    return Decision(ip in LOCALHOST)


def clean(text: str | bytes) -> str:
    """Text for a log line: controls and 8-bit bytes become `_`, spaces stay (unlike qmail-send's)."""
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    return raw.translate(_CLEAN_TABLE).decode("ascii")


_CLEAN_TABLE = bytes(b if 32 <= b < 127 else 95 for b in range(256))  # 95: '_'


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class QmqpListener:
    """One listening socket with its sessions."""

    def __init__(self, root: Root, host: str, port: int, *, log: Callable[[str], None] = print,
                 concurrency: int | None = None, timeout: float | None = None,
                 session_timeout: float = SESSION_MAX):
        ctl = root.control
        self.root = root
        self.host = host
        self.port = port
        self.log = log
        self.concurrency = concurrency or ctl.number("concurrencyqmqp", CONCURRENCY_DEFAULT) or 1
        self.timeout = timeout or ctl.number("timeoutqmqpd", TIMEOUT_DEFAULT) or TIMEOUT_DEFAULT
        self.session_timeout = session_timeout
        #: a session alone in this process writes the queue itself, without a worker thread;
        #: off where the loop has other work that must not wait for an fsync (the scheduler's)
        self.inline_alone = True
        self.me = ctl.line("me")
        self.queue = Queue(root.queue_dir)
        self.rules = RulesWatcher(os.path.join(root.rules_dir, RULES_CDB))
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watching = False
        self._sessions: dict[asyncio.Task, socket.socket] = {}
        self._poke_ids: list[int] = []  # committed this turn, not yet announced
        self._spare: Draft | None = None
        self._spare_lock = threading.Lock()
        self._spare_timer: asyncio.TimerHandle | None = None
        self._committer: Committer | None = None   # started at the first commit that needs it

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def bind(self) -> None:
        """Bind and listen now (port 0 picks a free port; `port` then says which).

        Separate from start() so a daemon can bind before it forks workers that
        share the socket, as tcpserver's children share its.
        """
        if self._sock is not None:
            return
        family = socket.AF_INET6 if ipaddress.ip_address(self.host).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.port = sock.getsockname()[1]

    async def start(self) -> None:
        """Bind (unless bind() did already) and start accepting."""
        self.bind()
        assert self._sock is not None
        self._loop = asyncio.get_running_loop()
        self._watch()
        self._make_spare()

    def close(self) -> None:
        """Stop accepting; sessions under way go on (see wait_closed)."""
        self._unwatch()
        self._drop_spare()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def wait_closed(self, grace: float = 10.0) -> None:
        """Close, give sessions `grace` seconds, then cut the rest off (nothing of theirs is queued)."""
        self.close()
        if self._sessions:
            await asyncio.wait(list(self._sessions), timeout=grace)
        for conn in list(self._sessions.values()):
            try:
                conn.shutdown(socket.SHUT_RDWR)  # their reads see EOF and they clean up
            except OSError:
                pass
        if self._sessions:
            await asyncio.wait(list(self._sessions), timeout=30)
        if self._committer is not None:
            self._committer.close()  # its sessions are over: nothing left for it
            self._committer = None
        self.rules.close()

    # -- accepting ---------------------------------------------------------------
    # The listening socket stays registered while a slot is free: unlike
    # loop.sock_accept(), no future, no epoll_ctl and no failed accept per connection.

    def _watch(self) -> None:
        if not self._watching and self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._acceptable)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching and self._loop is not None and self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._watching = False

    def _acceptable(self) -> None:
        """Accept what waits, while a slot is free; with none, the rest waits in the
        backlog unaccepted, as under tcpserver -c."""
        assert self._sock is not None and self._loop is not None
        while len(self._sessions) < self.concurrency:
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                self.log(f"qmqpd: warning: unable to accept: {clean(e.strerror or str(e))}")
                self._unwatch()
                self._loop.call_later(1, self._watch)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._serve(conn, peer[0]))
            self._sessions[task] = conn
            task.add_done_callback(self._session_done)
        self._unwatch()

    def _poke_soon(self, n: int) -> None:
        """Wake the scheduler for message `n` once this turn of the loop is over (the
        answer sent, the connection closed); sessions committing in the same turn
        share one poke."""
        if not self._poke_ids:
            assert self._loop is not None
            self._loop.call_soon(self._poke)
        self._poke_ids.append(n)

    def _poke(self) -> None:
        ids, self._poke_ids = self._poke_ids, []
        self.queue.poke(ids)

    def _session_done(self, task: asyncio.Task) -> None:
        self._sessions.pop(task, None)
        if len(self._sessions) < self.concurrency:
            self._watch()
        self._make_spare()

    # -- the spare draft -----------------------------------------------------------
    # Creating a queue entry's files (pid/ then mess/S/N, and intd/N) takes from
    # tens of microseconds to a millisecond, the more so on ext4 without a journal
    # after many recent deletions. A listener alone and idle makes the next
    # session's draft ahead, so that a lone client's message waits only for its
    # writes and fsyncs. The spare is an injection under way as far as the queue
    # knows: invisible to the scheduler, locked against cleanup, removed unused
    # after SPARE_IDLE seconds or when the listener closes.

    def _take_draft(self) -> Draft:
        """The spare draft if there is one, else a new one (in whatever thread writes)."""
        with self._spare_lock:
            spare, self._spare = self._spare, None
        return spare if spare is not None else self.queue.draft()

    def _make_spare(self) -> None:
        if (self._spare is not None or self._sessions or not self.inline_alone
                or self._sock is None or self._loop is None):
            return
        try:
            spare = self.queue.draft()
        except Exception:
            return  # the next session meets the trouble itself, and answers it
        try:
            spare.prepare()
        except Exception:
            spare.close()
            return
        self._spare = spare
        if self._spare_timer is not None:
            self._spare_timer.cancel()  # the last spare's, taken by now: one timer at most
        self._spare_timer = self._loop.call_later(SPARE_IDLE, self._drop_spare, spare)

    def _drop_spare(self, which: Draft | None = None) -> None:
        """Remove the spare (only if it is still `which`, when given)."""
        with self._spare_lock:
            spare = self._spare
            if spare is None or (which is not None and spare is not which):
                return
            self._spare = None
        spare.close()

    def policy(self, ip: str) -> Decision:
        """What the rules say for `ip`; CdbError/OSError when the cdb cannot be read."""
        reader = self.rules.current()
        return localhost_only(ip) if reader is None else match(reader, ip)

    async def _serve(self, conn: socket.socket, peer: str) -> None:
        ip = normalize_ip(peer)
        try:
            try:
                decision = self.policy(ip)
            except (CdbError, OSError) as e:
                self.log(f"qmqpd: drop {ip}: unable to read rules/{RULES_CDB}: {clean(str(e))}")
                return
            if not decision.allow:
                self.log(f"qmqpd: deny {ip}")
                return
            await self._session(conn, ip, decision)
        except Exception as e:  # a connection's edge: log it, never take the listener down
            self.log(f"qmqpd: drop {ip}: internal error: {type(e).__name__}: {clean(str(e))}")
        finally:
            conn.close()

    def _alone(self) -> bool:
        """Does a session do its own disk work? Alone in its process, the trip to a
        worker thread and back would cost more than the loop could do for anyone
        else meanwhile; off where the loop has other work (inline_alone)."""
        return self.inline_alone and len(self._sessions) <= 1

    async def _session(self, conn: socket.socket, ip: str, decision: Decision) -> None:
        loop = asyncio.get_running_loop()
        local = self.me or normalize_ip(conn.getsockname()[0])
        head = received_line("invoked from network", os.getpid()) + received("QMQP", local, ip, None)
        # The scheduler is woken after the answer, not before: the wake-up may hand
        # it the CPU, and the client should not wait for that (see _poke_soon).
        sink = QueueSink(self._take_draft, head)
        chunks: list[bytes] = []
        session = QmqpSession(chunks.append, databytes(decision.env.get("DATABYTES")))
        deadline = loop.time() + self.session_timeout
        pending: list[asyncio.Future] = []
        announced = False

        async def in_thread(fn: Callable, *args: object) -> object:
            if self._alone():
                return fn(*args)
            # Shielded: a cancelled session still lets its disk work finish (see finally).
            fut = loop.run_in_executor(None, fn, *args)
            pending[:] = [fut]
            return await asyncio.shield(fut)

        try:
            event: Event = NEED_DATA
            batch: list[bytes] = []
            while event is NEED_DATA:
                wait = min(self.timeout, deadline - loop.time())
                if wait <= 0:
                    raise asyncio.TimeoutError
                async with asyncio.timeout(wait):  # no task per read, unlike wait_for
                    data = await loop.sock_recv(conn, CHUNK)
                event = session.feed(data) if data else session.feed_eof()
                batch = chunks[:]
                chunks.clear()
                if batch and event is NEED_DATA:
                    await in_thread(sink.write_all, batch)
                    batch = []
            # The last data, the commit and its fsyncs: done here when alone, else by
            # the disk thread, together with the other sessions finishing meanwhile.
            if self._alone():
                assert isinstance(event, (Request, Refused))
                sink.write_all(batch)
                text = sink.finish(event)
            else:
                if self._committer is None:
                    self._committer = Committer(loop)
                fut = self._committer.finish(sink, batch, event)
                pending[:] = [fut]
                text = await asyncio.shield(fut)
            if sink.injected is not None:
                self._poke_soon(sink.injected.id)  # committed: the scheduler must hear of it, answered or not
                announced = True
            async with asyncio.timeout(self.timeout):
                await loop.sock_sendall(conn, answer(text))
            if isinstance(event, Request) and text.startswith("K"):
                self.log(f"qmqpd: ok {ip} msg {getattr(sink.injected, 'id', '?')} "
                         f"bytes {event.message_bytes} from <{safe(event.sender)}> "
                         f"rcpts {len(event.recipients)}")
            else:
                why = f" ({clean(sink.reason)})" if sink.reason else ""
                self.log(f"qmqpd: refused {ip} {clean(text)}{why}")
        except asyncio.TimeoutError:
            self.log(f"qmqpd: drop {ip}: timeout")
        except Truncated:
            self.log(f"qmqpd: drop {ip}: the client closed the connection before the end")
        except QmqpError as e:
            self.log(f"qmqpd: drop {ip}: protocol error: {clean(str(e))}")
        except OSError as e:
            self.log(f"qmqpd: drop {ip}: {clean(e.strerror or str(e))}")
        finally:
            if pending and not pending[0].done():
                await asyncio.wait(pending)  # never close the draft under a write
            if sink.injected is not None and not announced:
                self.queue.poke((sink.injected.id,))  # committed as the session was cancelled
            if sink.draft is not None:
                await in_thread(sink.discard)
