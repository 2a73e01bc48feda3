"""qmail-send: the scheduler. Preprocesses todo/, runs deliveries, retries, bounces.

One asyncio task owns all scheduling state; file work that fsyncs runs in
worker threads, local deliveries in children of the spawner (smarthost.lspawn),
remote deliveries through one pluggable coroutine. Log lines follow qmail-log(5).

Signals: the trigger fifo and SIGALRM make everything due now (ALRM) or
rescan todo/ (trigger; a poke that names its messages spares the listing);
SIGHUP rereads control files; SIGTERM finishes the deliveries under way and exits.
"""

from __future__ import annotations

import asyncio
import fcntl
import heapq
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable

from smarthost import schedule
from smarthost.bounce import BounceConfig, compose_head, decide
from smarthost.chain import Chain
from smarthost.logfmt import Log, safe
from smarthost.queue import Queue, received_line, trigger_ids
from smarthost.rewrite import Routing
from smarthost.root import Root
from smarthost.spawnclient import LocalSpawner
from smarthost.sendqueue import (IncompleteTodo, InjectionUnderWay, Message, Rcpt, SendQueue, TodoError,
                                 each_outcome)

#: todo/ is rescanned at least this often even without a trigger (qmail: 1500 s).
SCAN_INTERVAL = 1500
#: pokes that name their messages still make todo/ listed this often: any poke
#: then finds, as in qmail, a message whose own poke never came (its injector died)
NAMED_SCAN_INTERVAL = 10
#: leftovers of injections that died are swept this often (qmail-send: 76431 s).
CLEANUP_INTERVAL = 76431
#: retry after a system error (qmail: 123 s).
SYSTEM_RETRY = 123
#: messages preprocessed without fsync are made durable within this many seconds.
DURABLE_DELAY = 0.5
#: todo/ is preprocessed only this far ahead of the delivery slots (at least; see lookahead()).
LOOKAHEAD = 100
#: seconds finished messages wait to be removed together: one worker-thread turn for
#: all of them, not a wake-up of a thread (and its unlinks' GIL hand-backs) for each.
REMOVAL_GATHER = 0.02
LIFETIME_TEXT = "I'm not going to try again; this message has been in the queue too long."

#: (message, recipients of one domain, path of the mess file) -> one (letter, text) per recipient
RemoteDelivery = Callable[[Message, list[str], str], Awaitable[list[tuple[str, str]]]]


async def remote_unavailable(msg: Message, recipients: list[str], messpath: str) -> list[tuple[str, str]]:
    """The remote channel when no relay is configured: defer, keep the message."""
    text = "Remote delivery is not configured on this host yet; the message stays queued. (#4.3.0)"
    return [("Z", text)] * len(recipients)


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Settings:
    routing: Routing
    concurrency: dict
    lifetime: int
    bounce: BounceConfig

    @classmethod
    def from_root(cls, root: Root) -> "Settings":
        ctl = root.control
        me = ctl.line("me")
        return cls(
            routing=Routing.from_control(ctl),
            concurrency={"local": ctl.number("concurrencylocal", 10),
                         "remote": ctl.number("concurrencyremote", 20)},
            lifetime=ctl.number("queuelifetime", schedule.LIFETIME_DEFAULT),
            bounce=BounceConfig(
                bouncefrom=ctl.line("bouncefrom") or "MAILER-DAEMON",
                bouncehost=ctl.line("bouncehost") or me or "bouncehost",
                doublebounceto=ctl.line("doublebounceto") or "postmaster",
                doublebouncehost=ctl.line("doublebouncehost") or me or "doublebouncehost"))


class Scheduler:
    def __init__(self, root: Root, log: Log, remote: RemoteDelivery = remote_unavailable):
        self.root = root
        self.log = log
        self.queue = Queue(root.queue_dir)
        self.sq = SendQueue(self.queue)
        self.settings = Settings.from_root(root)
        self.remote = remote
        self.local = LocalSpawner(root)
        self.messages: dict[int, Message] = {}
        self.due: list[tuple[float, int, str]] = []           # heap of (when, id, channel)
        self.ready: dict[str, deque] = {"local": deque(), "remote": deque()}
        self.running = {"local": 0, "remote": 0}   # delivery slots taken (concurrencylocal, ...)
        self.in_flight = 0   # deliveries not yet recorded (a local one may hold no slot)
        self.passes: dict[tuple[int, str], tuple[float, bool]] = {}  # (id, chan) -> (next retry, expired)
        self.not_durable: deque[tuple[float, Message]] = deque()  # (preprocessed at, message)
        self.watching = False                 # make_durable() is running
        self.backlog: deque[int] = deque()    # todo/N a scan found, not preprocessed yet
        self.backlog_ids: set[int] = set()
        self.listed: set[int] = set()         # in the backlog by a listing only (preprocess's `listed`)
        self.reborn: set[int] = set()         # poked while the number's old message was being removed
        self.fresh: dict[int, Message] = {}   # preprocessed, todo/N their record, a delivery not started
        self.queued: dict[int, int] = {}      # message id -> its deliveries waiting in self.ready
        self.to_remove: list[tuple[Message, asyncio.Future]] = []
        self.removing = False                 # _removals() is running
        self.delivery_no = 0
        self.wake = asyncio.Event()
        self.synced = asyncio.Event()
        self.scan_wanted = True
        self.last_scan = 0.0  # time.time() of the last listing of todo/
        self.stopping = False
        self.tasks: set[asyncio.Task] = set()
        self.cleanup_interval = CLEANUP_INTERVAL
        self.lookahead_floor = LOOKAHEAD
        #: called once when SIGTERM arrives (the daemon closes its listeners there)
        self.on_stop: list[Callable[[], None]] = []
        #: called at SIGHUP, after the scheduler's own control files (the relay rereads its own)
        self.on_hup_hooks: list[Callable[[], None]] = []

    # -- helpers ---------------------------------------------------------------
    def status(self) -> None:
        c = self.settings.concurrency
        tail = " exitasap" if self.stopping else ""
        self.log(f"status: local {self.running['local']}/{c['local']} "
                 f"remote {self.running['remote']}/{c['remote']}{tail}")

    def spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def poke(self) -> None:
        self.wake.set()

    # -- start-up --------------------------------------------------------------
    def load_existing(self) -> None:
        """Start: every preprocessed message comes back, due at its channel files' mtimes."""
        self.queue.make_spare_dir()
        self.queue.cleanup()
        todo = set(self.queue.todo_ids())
        for n in self.queue.info_ids():
            if n in todo:
                continue
            msg = self.sq.load(n)
            if msg is None:
                continue
            self.messages[n] = msg
            if not msg.channels:
                self.spawn(self.finish(msg))
            for chan, ch in msg.channels.items():
                heapq.heappush(self.due, (ch.retry, n, chan))

    # -- todo --------------------------------------------------------------------
    def _preprocess_batch(self, ids: list[int], routing: Routing) -> list[tuple[int, Message | str]]:
        out: list[tuple[int, Message | str]] = []
        for n in ids:
            listed = n in self.listed
            self.listed.discard(n)
            try:
                out.append((n, self.sq.preprocess(n, routing, listed=listed)))
            except InjectionUnderWay:
                pass  # its injector's poke names it once its fsyncs are over
            except IncompleteTodo as e:
                self.sq.discard_incomplete(n)
                self.log(f"warning: removed todo/{n}: {safe(str(e))}: an injection that never finished")
            except FileNotFoundError:
                pass  # finished and removed since the scan saw it
            except (TodoError, OSError) as e:
                out.append((n, str(e)))
        return out

    def scan_todo(self) -> None:
        """List todo/ for what is not known yet."""
        self.note_todo(self.queue.todo_ids(), listed=True)

    def note_todo(self, ids: list[int], listed: bool = False) -> None:
        """Note the todo/N not seen yet; fill() preprocesses them as delivery slots come near.
        `listed`: found by listing todo/ rather than named by a poke (see SendQueue.preprocess)."""
        new = [n for n in dict.fromkeys(ids) if n not in self.messages and n not in self.backlog_ids]
        if listed:
            self.listed.update(new)
        else:
            self.listed.difference_update(ids)  # its injector is done with it
            # A number is free once its old message's mess file is gone (reused or
            # removed), which may be before finish() forgets that message.
            self.reborn.update(n for n in ids if n in self.messages and self.messages[n].finishing)
        self.backlog.extend(new)
        self.backlog_ids.update(new)

    def scan_due(self) -> bool:
        """A trigger asked for a scan, and the backlog is short enough to want one.

        Listing todo/ costs time in proportion to it; while a long backlog
        lasts, new arrivals wait for it anyway.
        """
        return self.scan_wanted and len(self.backlog) < self.lookahead()

    def lookahead(self) -> int:
        c = self.settings.concurrency
        return max(self.lookahead_floor, 2 * (c["local"] + c["remote"]))

    def fill(self) -> None:
        """Preprocess from the backlog while few fresh messages wait for a slot.

        A backlog stays in todo/, which is durable already: preprocessing it all at
        once would only make most of it wait, and waiting costs a persist (fsyncs).
        """
        room = min(self.lookahead() - len(self.fresh), len(self.backlog))
        if room <= 0:
            return
        ids = [self.backlog.popleft() for _ in range(room)]
        self.backlog_ids.difference_update(ids)
        routing = self.settings.routing
        # Reads only, so this is quick enough for the loop itself.
        results = self._preprocess_batch(ids, routing)
        now = time.time()
        for n, res in results:
            if isinstance(res, str):
                self.log(f"warning: trouble with todo/{n}: {safe(res)}; will try again later")
                continue
            msg = res
            self.messages[n] = msg
            self.log(f"new msg {n}")
            self.log(f"info msg {n}: bytes {msg.size} from <{safe(msg.sender)}> qp {msg.qp} uid {msg.uid}")
            self.not_durable.append((time.monotonic(), msg))
            if not msg.channels:
                self.spawn(self.finish(msg))
            else:
                self.fresh[n] = msg
            for chan in msg.channels:
                heapq.heappush(self.due, (now, n, chan))
        if self.not_durable and not self.watching:
            self.watching = True
            self.spawn(self.make_durable())

    async def make_durable(self) -> None:
        """Messages still waiting a moment after preprocessing are persisted (sendqueue's doc)."""
        try:
            while self.not_durable:
                await asyncio.sleep(max(0.0, self.not_durable[0][0] + DURABLE_DELAY - time.monotonic()))
                cut = time.monotonic() - DURABLE_DELAY
                batch = []
                while self.not_durable and self.not_durable[0][0] <= cut:
                    batch.append(self.not_durable.popleft()[1])
                # Still waiting for a slot, or partly done: todo/N alone would not say where it stands.
                await self.persist([m for m in batch if self.messages.get(m.id) is m
                                    and (m.id in self.fresh or m.progress)])
        finally:
            self.watching = False

    async def persist(self, msgs: list[Message]) -> None:
        """Write what `msgs` still have to do, fsync it, drop their todo/N (in a worker thread).

        Never for a message being finished: finish() removes todo/N itself, and
        once its mess file is gone the number N may belong to a new message.
        """
        batch = [m for m in msgs if m.todo and not m.finishing and not m.syncing]
        if not batch:
            return
        snaps = []
        for m in batch:
            m.syncing = True
            snaps.append(self.sq.snapshot(m))

        try:
            results = await asyncio.to_thread(each_outcome, lambda pair: self.sq.write_snapshot(*pair),
                                              list(zip(batch, snaps)))
            for m, snap, err in zip(batch, snaps, results):
                if err is None:
                    self.sq.after_snapshot(m, snap)
                    self.fresh.pop(m.id, None)
                else:
                    self.log(f"warning: trouble writing the state of msg {m.id}: {safe(str(err))}; "
                             f"todo/{m.id} stays")
        finally:
            for m in batch:
                m.syncing = False
            self.synced.set()
            self.synced.clear()
            self.poke()  # what was persisted no longer holds back the backlog

    # -- passes and deliveries ------------------------------------------------
    def start_due(self, now: float) -> None:
        while self.due and self.due[0][0] <= now and not self.stopping:
            _, n, chan = heapq.heappop(self.due)
            msg = self.messages.get(n)
            ch = msg.channels.get(chan) if msg else None
            if ch is None or (n, chan) in self.passes:
                continue
            expired = schedule.expired(msg.birth, now, self.settings.lifetime)
            self.passes[(n, chan)] = (schedule.next_retry(msg.birth, now, chan), expired)
            pending = ch.pending
            if chan == "remote":
                # One transaction per destination domain (beyond qmail's one per recipient).
                groups: dict[str, list[Rcpt]] = {}
                for rcpt in pending:
                    groups.setdefault(rcpt.addr.rpartition("@")[2].lower(), []).append(rcpt)
                for group in groups.values():
                    self.ready[chan].append((msg, chan, group))
                queued = len(groups)
            else:
                for rcpt in pending:
                    self.ready[chan].append((msg, chan, [rcpt]))
                queued = len(pending)
            self.queued[n] = self.queued.get(n, 0) + queued
            ch.busy = len(pending)
        for chan in ("local", "remote"):
            limit = self.settings.concurrency[chan]
            while self.ready[chan] and self.running[chan] < limit and not self.stopping:
                msg, chan_, rcpts = self.ready[chan].popleft()
                left = self.queued.pop(msg.id, 1) - 1
                if left:
                    self.queued[msg.id] = left
                else:
                    self.fresh.pop(msg.id, None)
                self.running[chan] += 1
                self.in_flight += 1
                self.spawn(self.run_delivery(msg, chan, rcpts))

    async def run_delivery(self, msg: Message, chan: str, rcpts: list[Rcpt]) -> None:
        """One delivery slot: a local recipient, or a remote destination's recipients."""
        numbers = []
        for rcpt in rcpts:  # each recipient keeps its own delivery number and log lines
            self.delivery_no += 1
            numbers.append(self.delivery_no)
            self.log(f"starting delivery {self.delivery_no}: msg {msg.id} to {chan} {safe(rcpt.addr)}")
        self.status()
        results: list[tuple[str, str]]
        held = True

        def free_slot() -> None:
            """The slot's work is done (a local child may report before its new/ is synced)."""
            nonlocal held
            if held:
                held = False
                self.running[chan] -= 1
                self.poke()

        try:
            if chan == "local":
                results = [await self.local.deliver(msg.id, msg.sender, rcpts[0].addr, free_slot)]
            else:
                results = list(await self.remote(msg, [r.addr for r in rcpts], self.queue.mess(msg.id)))
            if len(results) != len(rcpts):
                raise ValueError("one report per recipient")
        except Exception as e:  # a delivery's edge: defer, keep the message
            results = [("Z", f"Delivery trouble: {type(e).__name__}. (#4.3.0)")] * len(rcpts)
        free_slot()
        self.in_flight -= 1
        next_retry, expired = self.passes.get((msg.id, chan), (0.0, False))
        ch = msg.channels[chan]
        for d, rcpt, (letter, text) in zip(numbers, rcpts, results):
            self.record(d, msg, chan, rcpt, letter, text, expired)
        ch.busy -= len(rcpts)
        self.status()
        if ch.busy == 0:
            self.end_pass(msg, chan, next_retry)
        self.poke()

    def record(self, d: int, msg: Message, chan: str, rcpt: Rcpt, letter: str, text: str,
               expired: bool) -> None:
        """Log one recipient's outcome and keep it: done, bounced, or still to do."""
        if not letter or letter not in "KZD":
            letter, text = "Z", "Report mangled, will defer. (#4.3.0)"
        if letter == "Z" and expired:
            letter, text = "D", text.rstrip("\n") + "\n" + LIFETIME_TEXT
        kind = {"K": "success", "Z": "deferral", "D": "failure"}[letter]
        self.log(f"delivery {d}: {kind}: {safe(text)}")
        try:
            if letter in "KD":
                if letter == "D":
                    self.sq.add_bounce(msg, self.settings.routing.unprepend(rcpt.addr), text)
                self.sq.mark_done(msg, chan, rcpt)
        except OSError as e:
            self.log(f"warning: trouble marking msg {msg.id}: {safe(e.strerror or str(e))}")

    def end_pass(self, msg: Message, chan: str, next_retry: float) -> None:
        self.passes.pop((msg.id, chan), None)
        ch = msg.channels[chan]
        if ch.pending:
            self.sq.set_retry(msg, chan, next_retry)
            heapq.heappush(self.due, (next_retry, msg.id, chan))
            if msg.todo:
                # It has to wait: its retry time must survive a restart.
                self.spawn(self.persist([msg]))
            return
        self.sq.channel_done(msg, chan)
        if not msg.channels:
            self.spawn(self.finish(msg))

    async def finish(self, msg: Message) -> None:
        """Both channels done: send the bounce if any, then remove the message."""
        msg.finishing = True
        while msg.syncing:
            await self.synced.wait()
        records = self.sq.bounce_records(msg)
        if records is not None:
            plan = decide(msg.sender, self.settings.bounce)
            if plan is None:
                self.log(f"triple bounce: discarding bounce/{msg.id}")
            else:
                try:
                    qp = await asyncio.to_thread(self.inject_bounce, msg, plan, records)
                except Exception as e:
                    self.log(f"warning: unable to inject bounce message for msg {msg.id}: "
                             f"{safe(str(e))}; will try again later")
                    loop = asyncio.get_running_loop()
                    loop.call_later(SYSTEM_RETRY, lambda: self.spawn(self.finish(msg)))
                    return
                self.log(f"bounce msg {msg.id} qp {qp}")
        await self.remove(msg)
        self.messages.pop(msg.id, None)
        self.fresh.pop(msg.id, None)
        self.log(f"end msg {msg.id}")
        if msg.id in self.reborn:
            self.reborn.discard(msg.id)
            self.note_todo([msg.id])  # its injector's poke came early
            self.poke()
        elif os.path.exists(self.queue.todo(msg.id)):
            # The number was free for a moment and a new message took it; a scan
            # that ran meanwhile skipped it as ours.
            self.scan_wanted = True
            self.poke()

    async def remove(self, msg: Message) -> None:
        """Remove a finished message's files (in a worker thread, with the others finished
        within REMOVAL_GATHER).

        An unlink can wait for the filesystem's journal behind other processes'
        fsyncs, or for the disk's discard; the loop must not. The message stays in
        self.messages until its files are gone, so no scan takes its todo/N for a new one.
        """
        fut = asyncio.get_running_loop().create_future()
        self.to_remove.append((msg, fut))
        if not self.removing:
            self.removing = True
            self.spawn(self._removals())
        await fut

    async def _removals(self) -> None:
        try:
            while self.to_remove:
                await asyncio.sleep(REMOVAL_GATHER)
                batch, self.to_remove = self.to_remove, []
                try:
                    errors = await asyncio.to_thread(self.sq.finish_all, [m for m, _ in batch])
                except BaseException:
                    for _, fut in batch:
                        fut.cancel()
                    raise
                for (m, fut), err in zip(batch, errors):
                    if not fut.done():
                        fut.set_result(None) if err is None else fut.set_exception(err)
        finally:
            self.removing = False
            left, self.to_remove = self.to_remove, []  # cancelled while gathering: nothing removed
            for _, fut in left:
                fut.cancel()

    def inject_bounce(self, msg: Message, plan, records: bytes) -> int:
        head = compose_head(plan, msg.sender, records, self.settings.bounce)
        with open(self.queue.mess(msg.id), "rb") as body:
            done = self.queue.inject(Chain(head, body), plan.sender, [plan.recipient],
                                     received=received_line("for bounce"), trigger=True)
        return done.qp

    async def cleanup(self) -> None:
        """qmail-clean's periodic sweep, in a worker thread."""
        try:
            removed = await asyncio.to_thread(self.queue.cleanup)
        except OSError as e:
            self.log(f"warning: trouble cleaning the queue: {safe(str(e))}")
            return
        for n in removed:
            self.log(f"warning: removed mess/{n % self.queue.split}/{n}: an injection that never finished")

    # -- signals -----------------------------------------------------------------
    def on_alarm(self) -> None:
        now = time.time()
        self.due = [(min(w, now), n, c) for (w, n, c) in self.due]
        heapq.heapify(self.due)
        self.poke()

    def on_hup(self) -> None:
        try:
            self.settings = Settings.from_root(self.root)
        except OSError as e:
            self.log(f"alert: unable to reread controls: {safe(str(e))}")
        for fn in self.on_hup_hooks:
            fn()
        self.poke()

    def on_term(self) -> None:
        if not self.stopping:
            for fn in self.on_stop:
                fn()
        self.stopping = True
        self.poke()

    def on_trigger(self, fd: int, capacity: int) -> None:
        data = b""
        try:
            while chunk := os.read(fd, 65536):
                if len(data) < capacity:  # beyond that it means "scan" anyway
                    data += chunk
        except BlockingIOError:
            pass
        ids = trigger_ids(data, capacity)
        if ids is None or time.time() - self.last_scan >= NAMED_SCAN_INTERVAL:
            self.scan_wanted = True
        if ids is not None and not self.stopping:
            self.note_todo(ids)
        self.poke()

    # -- main loop -----------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        await self.local.start()
        trigger_fd = os.open(self.queue.trigger, os.O_RDWR | os.O_NONBLOCK)
        try:
            capacity = fcntl.fcntl(trigger_fd, fcntl.F_GETPIPE_SZ)
        except (AttributeError, OSError):
            capacity = 0  # unknown: every poke means "scan", as in qmail
        loop.add_reader(trigger_fd, self.on_trigger, trigger_fd, capacity)
        for sig, fn in ((signal.SIGALRM, self.on_alarm), (signal.SIGHUP, self.on_hup),
                        (signal.SIGTERM, self.on_term), (signal.SIGINT, self.on_term),
                        (signal.SIGIO, _nothing)):  # a lease broken (sendqueue._alone) must not kill us
            loop.add_signal_handler(sig, fn)
        self.load_existing()
        self.status()
        last_cleanup = time.time()  # load_existing() just swept
        try:
            while True:
                now = time.time()
                if now - last_cleanup >= self.cleanup_interval and not self.stopping:
                    last_cleanup = now
                    self.spawn(self.cleanup())
                if self.stopping:
                    if not self.in_flight:
                        break
                else:
                    if self.scan_due() or now - self.last_scan >= SCAN_INTERVAL:
                        self.scan_wanted = False
                        self.last_scan = now
                        self.scan_todo()
                    self.fill()
                    now = time.time()
                self.start_due(now)
                self.log.flush()
                delay = min(SCAN_INTERVAL, self.cleanup_interval)
                if self.due:
                    delay = max(0.0, min(delay, self.due[0][0] - now))
                self.wake.clear()
                if self.scan_due() and not self.stopping:
                    continue
                try:
                    async with asyncio.timeout(delay):  # no task per turn, unlike wait_for
                        await self.wake.wait()
                except TimeoutError:
                    pass
        finally:
            loop.remove_reader(trigger_fd)
            os.close(trigger_fd)
            for t in list(self.tasks):
                if not t.done():
                    try:
                        await asyncio.wait_for(t, 30)
                    except (asyncio.TimeoutError, Exception):
                        pass
            # A clean stop leaves no todo/N behind for a message partly done, so a
            # restart does not deliver anything twice; the untouched keep theirs.
            await self.persist([m for m in self.messages.values() if m.todo and m.progress])
            await self.local.stop()
            self.status()
            self.log("status: exiting")
            self.log.flush()
