"""The scheduler's side of local delivery: the spawner (smarthost.lspawn) and its children.

The spawner only forks; the scheduler keeps its end of each child's socket and
talks to the child itself, so a delivery costs one send and one receive in each
process, not a relay through a third. In system mode the scheduler opens the
queued message and sends it along, as qmail-lspawn hands qmail-local its fd 0.
Here live the pool's rules, after Postfix's local(8): a child that has reported
waits up to IDLE seconds for another delivery of the same user and serves at
most REUSE.

A child's report counts only once the new/ directories it carries are fsynced
(NewDirSync): one fsync a directory for all the reports that arrived meanwhile.

Kept apart from smarthost.lspawn on purpose: this side needs asyncio, and the
spawner must not import it (its at-fork hooks would run in every delivery child).
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
import sys
from typing import Callable

from miniqmail import maildir
from miniqmail.fdio import why
from smarthost import users
from smarthost.lspawn import NEW_DIRS_MAX, RESULT_LIMIT, clean_text, letter_for, receive
from smarthost.queue import Queue
from smarthost.root import Root

#: deliveries one child makes at most, one after another. Postfix's local stops at
#: 100 (max_use); a child of ours costs far more to start (a fork of the spawner, then
#: a copy of every page either touches), so it is spread over more deliveries.
REUSE = 1000
#: seconds a child that has reported waits for another delivery
IDLE = 2.0
CRASHED = "ZDelivery process crashed. (#4.3.0)"
#: seconds a new spawner has to say it is ready (it loads the delivery code and warms up)
START_TIMEOUT = 30.0


class NewDirSync:
    """fsyncs the new/ directories delivery children linked messages into, in turns:
    while one turn's fsyncs run, the reports that arrive wait for the next, which
    fsyncs each directory once for all of them (group commit across children).

    The fsyncs go to the kernel with AIO (aiofsync.LoopFsyncs), so the loop never
    waits and no thread wakes for them; where AIO is not to be had, to a thread."""

    def __init__(self) -> None:
        self.waiting: list[tuple[list[int], asyncio.Future]] = []
        self.turns: asyncio.Task | None = None
        self.kernel = None        # aiofsync.LoopFsyncs, once opened
        self.threads = False      # AIO is not to be had: every turn in a thread

    def sync(self, fds: list[int]) -> asyncio.Future:
        """Take `fds` (they are closed here) and sync what they name: the future's
        result is None once they are durable, or why one of them is not."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.waiting.append((fds, fut))
        if self.turns is None:
            self.turns = loop.create_task(self._run())
        return fut

    async def _run(self) -> None:
        try:
            while self.waiting:
                turn, self.waiting = self.waiting, []
                reports = [fds for fds, _ in turn]
                try:
                    errors = await self._turn(reports)
                except asyncio.CancelledError:
                    for _, fut in turn:
                        fut.cancel()
                    raise
                except Exception as e:  # no thread to run it in, say
                    errors = [f"{type(e).__name__}: {e}"] * len(turn)
                for (_, fut), error in zip(turn, errors):
                    if not fut.done():
                        fut.set_result(error)
        finally:
            self.turns = None
            for fds, fut in self.waiting:  # cancelled (the loop is closing): nothing synced
                _close(fds)
                fut.cancel()
            self.waiting = []

    async def _turn(self, reports: list[list[int]]) -> list[str | None]:
        """One turn's fsyncs, by AIO where it is to be had. The descriptors are closed
        once, whatever happens: here, or by sync_dirs in its thread (which runs on even
        if the turn is cancelled)."""
        try:
            kernel = self._kernel()
            futs = None
            if kernel is not None:
                dirs, uses = distinct_dirs(reports)
                futs = kernel.fsync(dirs)
            if futs is None:
                thread = asyncio.get_running_loop().run_in_executor(None, sync_dirs, reports)
        except BaseException:
            for fds in reports:
                _close(fds)
            raise
        if futs is None:
            return await thread
        try:
            outcomes = await asyncio.gather(*futs, return_exceptions=True)
        finally:
            for fds in reports:
                _close(fds)  # (the kernel holds what it syncs until it is done)
        return _per_report(uses, [_dir_outcome(o) for o in outcomes])

    def _kernel(self):
        if self.kernel is None and not self.threads:
            from smarthost import aiofsync  # ctypes: only where something is delivered
            self.kernel = aiofsync.LoopFsyncs.open(asyncio.get_running_loop())
            self.threads = self.kernel is None
        elif self.kernel is not None and self.kernel.ctx is None:  # it found no AIO fsync
            self.kernel, self.threads = None, True
        return self.kernel

    def close(self) -> None:
        """Free the AIO context (after the fsyncs under way)."""
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None


def distinct_dirs(reports: list[list[int]]) -> tuple[list[int], list[list[int | str]]]:
    """One descriptor for each distinct directory (device and inode) `reports` name;
    for each report, the indexes of its own among them, or why fstat failed."""
    index: dict[tuple[int, int], int] = {}
    dirs: list[int] = []
    uses: list[list[int | str]] = []
    for fds in reports:
        mine: list[int | str] = []
        for fd in fds:
            try:
                st = os.fstat(fd)
            except OSError as e:
                mine.append(why(e))
                continue
            key = (st.st_dev, st.st_ino)
            if key not in index:
                index[key] = len(dirs)
                dirs.append(fd)
            mine.append(index[key])
        uses.append(mine)
    return dirs, uses


def _per_report(uses: list[list[int | str]], outcomes: list[str | None]) -> list[str | None]:
    """For each report: None, or why the first of its directories failed."""
    out = []
    for mine in uses:
        errors = [u if isinstance(u, str) else outcomes[u] for u in mine]
        out.append(next((e for e in errors if e is not None), None))
    return out


def _dir_outcome(outcome: BaseException | None) -> str | None:
    """An fsync's outcome as a report takes it: a filesystem that cannot sync directories
    needs nothing more (maildir.fsync_dir)."""
    if outcome is None:
        return None
    if isinstance(outcome, OSError):
        return None if outcome.errno in maildir.NO_DIRSYNC else why(outcome)
    return f"{type(outcome).__name__}: {outcome}"


def sync_dirs(reports: list[list[int]]) -> list[str | None]:
    """fsync each directory the descriptors of `reports` name, once however many name
    it; close them all. For each report: None, or why one of its directories failed."""
    try:
        dirs, uses = distinct_dirs(reports)
        outcomes: list[str | None] = []
        for fd in dirs:
            try:
                maildir.fsync_dir(fd)
                outcomes.append(None)
            except OSError as e:
                outcomes.append(why(e))
        return _per_report(uses, outcomes)
    finally:
        for fds in reports:
            _close(fds)


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Child:
    """A delivery child as the scheduler sees it: our end of its socket, and what it is doing."""

    __slots__ = ("sock", "key", "served", "fut", "idle_since")

    def __init__(self, sock: socket.socket, key: object):
        self.sock, self.key = sock, key
        self.served = 0
        self.fut: asyncio.Future | None = None   # the delivery it is on
        self.idle_since = 0.0


class LocalSpawner:
    """Local deliveries, each in a child of smarthost.lspawn.

    A child that dies costs only the delivery it was on ("crashed", deferred). A
    spawner that dies (killed, out of memory) costs nothing under way: its
    children go on, and the next fork starts a new spawner.
    """

    def __init__(self, root: Root):
        self.root = root
        self.queue = Queue(root.queue_dir)
        self.system_mode = root.mode == "system"
        self.proc: asyncio.subprocess.Process | None = None
        self.sock: socket.socket | None = None
        self.alive = False
        self.closing = False
        self.children: set[Child] = set()
        self.idle: dict[object, list[Child]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._restart = asyncio.Lock()   # one new spawner, however many deliveries find it dead
        self.new_dirs = NewDirSync()

    # -- the spawner ------------------------------------------------------------
    async def start(self) -> None:
        """A new spawner, ready once it says so; one that stays silent for START_TIMEOUT,
        says something else or dies first is killed, and this raises."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "smarthost.lspawn", self.root.path,
                stdin=theirs.fileno(), stdout=asyncio.subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        try:
            try:
                async with asyncio.timeout(START_TIMEOUT):
                    hello = await loop.sock_recv(ours, 1)
            except TimeoutError:
                raise RuntimeError(f"local delivery spawner silent for {START_TIMEOUT:g} s") from None
            if hello != b"+":
                raise RuntimeError("local delivery spawner did not start")
        except BaseException:
            ours.close()
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            await proc.wait()
            raise
        self.proc, self.sock, self.alive = proc, ours, True
        loop.add_reader(ours.fileno(), self._spawner_said, ours, proc)

    def _spawner_said(self, sock: socket.socket, proc: asyncio.subprocess.Process) -> None:
        """The spawner never writes after its hello: anything readable is its end."""
        try:
            if sock.recv(16):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._lost(sock, proc)

    def _lost(self, sock: socket.socket, proc: asyncio.subprocess.Process | None) -> None:
        """Done with a spawner's socket; reap `proc` in the background, if given."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        sock.close()
        if self.sock is sock:
            self.sock, self.alive = None, False
        if proc is not None:
            loop.create_task(proc.wait())  # reap it

    def _fork(self, key: object) -> Child:
        """A fresh child: a socket pair made here, its end handed to the spawner to fork with."""
        assert self.sock
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            socket.send_fds(self.sock, [b"F"], [theirs.fileno()])
        except OSError:
            ours.close()
            self._lost(self.sock, self.proc)
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        child = Child(ours, key)
        self.children.add(child)
        asyncio.get_running_loop().add_reader(ours.fileno(), self._readable, child)
        return child

    # -- deliveries -------------------------------------------------------------
    def key_for(self, recipient: str) -> object:
        """Which children may take this delivery: any in user mode, else one of the same user."""
        if not self.system_mode:
            return None
        try:
            user = users.resolve(self.root.path, recipient.rpartition("@")[0], system_mode=True)
        except Exception:
            return object()  # a child of its own, which reports the trouble
        return (user.uid, user.gid)

    async def deliver(self, messid: int, sender: str, recipient: str,
                      reported: Callable[[], None] | None = None) -> tuple[str, str]:
        """One local delivery in a child: (K, Z or D, the report's text).

        `reported` runs as soon as the child has reported, when the rest is the
        scheduler's own wait for new/ (NewDirSync) and the child is free."""
        request = b"%d\0%s\0%s" % (messid, sender.encode("utf-8", "surrogateescape"),
                                    recipient.encode("utf-8", "surrogateescape"))
        fd = -1
        if self.system_mode:
            try:
                fd = os.open(self.queue.mess(messid), os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                return "Z", f"Unable to open the queued message: {why(e)} (#4.3.0)"
        try:
            child = await self._hand(fd, request, self.key_for(recipient))
        finally:
            if fd >= 0:
                os.close(fd)  # the child has its own
        if child is None:
            return CRASHED[:1], CRASHED[1:]
        child.served += 1
        child.fut = fut = asyncio.get_running_loop().create_future()
        report, fds = await fut
        if fds:
            if reported is not None:
                reported()
            error = await self.new_dirs.sync(fds)
            if error is not None and report[:1] == "K":
                # Linked, but not known to be durable: deliver it again later.
                report = f"ZUnable to sync the maildir: {error}. (#4.3.0)"
        return report[:1] or "Z", report[1:]

    async def _hand(self, fd: int, request: bytes, key: object) -> Child | None:
        """Send the request to an idle child of `key`, else a fresh one; None if a fresh one failed."""
        restarted = False
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd >= 0 else []
        while True:
            idle = self.idle.get(key)
            if idle:
                child = idle.pop()
            else:
                if not self.alive:
                    async with self._restart:
                        if not self.alive:
                            await self.start()  # trouble raises: run_delivery() defers the delivery
                            restarted = True
                try:
                    child = self._fork(key)
                except OSError:
                    if restarted:
                        raise
                    restarted = True
                    continue  # the spawner was gone: start a new one, once
            try:
                # An idle child is waiting for exactly this: its socket has room.
                child.sock.sendmsg([request], rights)
                return child
            except OSError:
                self._drop(child)   # it died while idle
                if not child.served:
                    return None

    def _readable(self, child: Child) -> None:
        try:
            data, fds, cut = receive(child.sock, RESULT_LIMIT, NEW_DIRS_MAX)
        except BlockingIOError:
            return
        except OSError:
            data, fds, cut = b"", [], False
        code_s, sep, text = data.partition(b"\0")
        if (not data or cut or child.fut is None
                or not sep or not code_s.lstrip(b"-").isdigit()):
            _close(fds)
            self._drop(child)  # its end of file, or it broke the protocol: it gets no more work
            return
        fut, child.fut = child.fut, None
        if fut.done():  # its delivery was cancelled
            _close(fds)
        else:
            fut.set_result((letter_for(int(code_s)) + clean_text(text.decode("utf-8", "surrogateescape")), fds))
        if child.served >= REUSE or self.closing:
            self._drop(child)
            return
        child.idle_since = asyncio.get_running_loop().time()
        self.idle.setdefault(child.key, []).append(child)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(IDLE, self._expire)

    def _drop(self, child: Child) -> None:
        """Done with a child: it sees our end close and exits (one still delivering dies of
        SIGPIPE at its report). A delivery it was on is reported crashed."""
        if child.sock.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(child.sock.fileno())
            child.sock.close()
        self.children.discard(child)
        idle = self.idle.get(child.key)
        if idle and child in idle:
            idle.remove(child)
        fut, child.fut = child.fut, None
        if fut is not None and not fut.done():
            fut.set_result((CRASHED, []))

    def _expire(self) -> None:
        """Retire the children idle for IDLE seconds; come back for the rest."""
        self._sweep = None
        now = asyncio.get_running_loop().time()
        soonest = None
        for key, idle in list(self.idle.items()):
            for child in [c for c in idle if c.idle_since + IDLE <= now]:
                self._drop(child)
            for child in idle:
                left = child.idle_since + IDLE - now
                soonest = left if soonest is None else min(soonest, left)
            if not idle:
                del self.idle[key]
        if soonest is not None:
            self._sweep = asyncio.get_running_loop().call_later(soonest, self._expire)

    async def stop(self) -> None:
        """Retire every child (one on a delivery finishes it first), then the spawner."""
        self.closing = True
        for idle in list(self.idle.values()):
            for child in list(idle):
                self._drop(child)
        self.idle.clear()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if self.sock is not None:
            self._lost(self.sock, None)  # its end of file tells the spawner to go
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.new_dirs.close()
