"""qmail-send's side of the queue: preprocessing todo/N, channel files, done marks, removal.

Formats (INTERNALS, qmail-send.c):
  todo/N      the envelope as qmail-queue wrote it: `u`uid, `p`pid, `F`sender, `T`rcpt, each NUL-ended,
              then our injectors' check record `c` (see smarthost.queue)
  info/S/N    `F`sender NUL; its mtime is the message's birth
  local/S/N   `T`addr NUL per recipient, remote/S/N likewise; a finished recipient's `T`
  remote/S/N  is overwritten in place with `D` (one byte, atomic); the file's mtime is
              the channel's next retry time
  bounce/N    `<addr>:` report paragraphs of permanent failures, appended

Where qmail writes info, channel files and fsyncs them for every message before
it removes todo/N, this scheduler keeps a fresh message's state in memory and
todo/N as its durable record. It persists (writes the files of what is still to
do, fsyncs them, then removes todo/N) only when the message has to wait: a
deferral, a delivery not started after a moment, some recipients done while
others are not, or a clean shutdown after some were done. Mail delivered at
once therefore costs no files beyond mess and todo. A crash while
todo/N exists means preprocessing again: duplicates are possible, losses are not.

Removal order is fixed (todo and intd, then bounce, channel files, info, then
mess): once mess/S/N is gone, N may name a new message, and nothing of the old
one may be left for it to inherit. Without info/N there are never channel or
bounce files. intd and mess go to spare/ rather than away while it has room
(smarthost.queue); the mess file so keeps its inode, and a new message that
takes it gets N back at once.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from miniqmail.fdio import write_all
from smarthost.queue import CHECKED, SPARE_SIZE_MAX, Queue, TornEntry, message_check, split_check
from smarthost.rewrite import Routing

CHANNELS = ("local", "remote")


class TodoError(ValueError):
    """A todo/N that cannot be understood: left in place and retried later."""


class IncompleteTodo(TodoError):
    """An envelope cut short (empty, no final NUL, no sender, empty records) or a
    message or envelope that is not what the check record says: a crash hit an
    injection between its todo link and the end of its fsyncs, so nobody was
    told "queued"."""


class InjectionUnderWay(Exception):
    """todo/N whose injector still holds its mess file's lock: its fsyncs are not
    over, and its poke will name it when they are."""


@dataclass(eq=False)
class Rcpt:
    addr: str
    offset: int | None = None   # of its record in the channel file, once persisted
    done: bool = False


@dataclass
class Channel:
    """One message's recipients on one channel."""

    name: str
    rcpts: list[Rcpt]
    retry: float = 0.0
    busy: int = 0           # deliveries under way in the current pass

    @property
    def pending(self) -> list[Rcpt]:
        return [r for r in self.rcpts if not r.done]


@dataclass(eq=False)
class Message:
    id: int
    birth: float
    sender: str
    size: int = 0
    qp: int = 0
    uid: int = 0
    channels: dict[str, Channel] = field(default_factory=dict)
    todo: bool = True        # todo/N still exists: the files are not (all) durable
    persisted: bool = False  # info/N and channel files exist
    bounces: list[bytes] = field(default_factory=list)  # failure records not yet in bounce/N
    bounce_file: bool = False
    syncing: bool = False    # a worker thread is persisting it
    progress: bool = False   # some recipient is done: a crash would deliver it again
    finishing: bool = False
    unsure: bool = False     # found by a listing: mess may not be durable yet (preprocess)


@dataclass
class Snapshot:
    """What persist() writes, taken on the scheduler's thread."""

    info: bytes
    channels: list[tuple[str, bytes, list[tuple[Rcpt, int]], float]]
    bounces: int             # how many of msg.bounces it writes


def _records(data: bytes) -> list[bytes]:
    if data and not data.endswith(b"\0"):
        raise IncompleteTodo("truncated record")
    return data.split(b"\0")[:-1] if data else []


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def each_outcome(fn: Callable, items: list) -> list[OSError | None]:
    """In a worker thread: fn(item) for each item in turn; for each, the OSError it raised or None."""
    out: list[OSError | None] = []
    for item in items:
        try:
            fn(item)
            out.append(None)
        except OSError as e:
            out.append(e)
    return out


def _alone(path: str) -> bool:
    """Whether nothing else has `path` open: a program a delivery ran gets the message
    file itself as its standard input (as from qmail-local), and whatever it left
    running must go on reading that message, not a new one. The kernel grants a
    write lease only to the sole opener (fcntl(2), F_SETLEASE); it is given back at
    once. Where leases are off, no file counts as alone. Someone opening the file
    meanwhile waits for the give-back, and its lease-break SIGIO is the scheduler's
    to ignore (Scheduler.run)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _retire(path: str, spare: str, room: dict[str, int], kind: str) -> None:
    """Move a finished message's file to spare/ while there is room, else remove it."""
    if room.get(kind, 0) > 0:
        try:
            os.rename(path, spare)
        except FileNotFoundError:
            return
        room[kind] -= 1
    else:
        _unlink(path)


def bounce_record(addr: str, report: str) -> bytes:
    """One failure as qmail-send's addbounce() records it."""
    lines = [ln if ln.strip() else "/" for ln in report.rstrip("\n").split("\n")]
    return _bytes(f"<{addr.replace(chr(10), '_')}>:\n" + "\n".join(lines) + "\n\n")


def _listed_size(path: str, check: tuple[int, int] | None) -> int:
    """The size of a listed todo/N's message, once its injection is over and the
    message is what the check record says (see SendQueue.preprocess)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InjectionUnderWay(path) from None
        if check is None:  # an older queue's envelope: nothing to check against
            return os.fstat(fd).st_size
        if message_check(fd) != check:
            raise IncompleteTodo("the message is not what the check record says")
        return check[0]
    finally:
        os.close(fd)


class SendQueue:
    """File operations of qmail-send on a Queue."""

    def __init__(self, queue: Queue):
        self.q = queue

    # -- todo/N (qmail-send.c todo_do, without its files) --------------------
    def preprocess(self, n: int, routing: Routing, now: float | None = None,
                   listed: bool = False) -> Message:
        """Read todo/N and route its recipients; the state stays in memory.

        `listed`: todo/N was found by listing todo/, not named by its injector's
        poke, so its injection may be under way (InjectionUnderWay), dead before its
        fsyncs returned, or cut short by a crash: the message is checked against the
        envelope's check record (IncompleteTodo if it differs), and marked `unsure`
        so that a persist makes it durable before todo/N goes."""
        q = self.q
        with open(q.todo(n), "rb") as f:
            data = f.read()
            checked = bool(os.fstat(f.fileno()).st_mode & CHECKED)
        try:
            records, check = split_check(data, checked, n)
        except TornEntry as e:
            raise IncompleteTodo(str(e)) from None
        uid = qp = 0
        sender = None
        rcpts: dict[str, list[Rcpt]] = {c: [] for c in CHANNELS}
        for rec in _records(records):
            kind, value = rec[:1], rec[1:]
            if kind == b"u" and value.isdigit():
                uid = int(value)
            elif kind == b"p" and value.isdigit():
                qp = int(value)
            elif kind == b"F" and sender is None:
                sender = _text(value)
            elif kind == b"T":
                chan, addr = routing.route(_text(value))
                rcpts[chan].append(Rcpt(addr))
            elif not rec:
                raise IncompleteTodo("an empty record")  # zeros where a crash left no data
            elif kind not in (b"u", b"p"):
                raise TodoError(f"unknown record {rec[:20]!r}")
        if sender is None:
            raise IncompleteTodo("no sender record")
        try:
            size = _listed_size(q.mess(n), check) if listed else os.stat(q.mess(n)).st_size
        except FileNotFoundError:
            raise TodoError("mess file missing") from None
        # Left by a persist that a crash cut short: start from scratch.
        if _unlink(q.info(n)):
            for p in (q.channel("local", n), q.channel("remote", n), q.bounce(n)):
                _unlink(p)
        birth = time.time() if now is None else now
        msg = Message(n, birth, sender, size, qp, uid, unsure=listed)
        for chan in CHANNELS:
            if rcpts[chan]:
                msg.channels[chan] = Channel(chan, rcpts[chan], retry=birth)
        return msg

    def discard_incomplete(self, n: int) -> None:
        """Remove an injection whose envelope a crash cut short (see IncompleteTodo)."""
        q = self.q
        for p in (q.todo(n), q.intd(n), q.mess(n)):
            _unlink(p)

    # -- persisting -----------------------------------------------------------
    def snapshot(self, msg: Message) -> Snapshot:
        chans = []
        for name, ch in msg.channels.items():
            buf = bytearray()
            where = []
            for r in ch.rcpts:
                if not r.done:
                    where.append((r, len(buf)))
                    buf += b"T" + _bytes(r.addr) + b"\0"
            if where:
                chans.append((name, bytes(buf), where, ch.retry))
        return Snapshot(b"F" + _bytes(msg.sender) + b"\0", chans, len(msg.bounces))

    def write_snapshot(self, msg: Message, snap: Snapshot) -> None:
        """Worker thread: write, fsync, then drop todo/N. Touches no Message field."""
        q, n = self.q, msg.id
        if msg.unsure:  # its injector may have died before its fsyncs: todo/N is its only check
            fd = os.open(q.mess(n), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        files = [(q.info(n), snap.info, msg.birth)]
        files += [(q.channel(name, n), data, retry) for name, data, _, retry in snap.channels]
        if snap.bounces:
            files.append((q.bounce(n), b"".join(msg.bounces[: snap.bounces]), None))
        for path, data, mtime in files:
            fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            if mtime is not None:
                os.utime(path, (mtime, mtime))
        for p in (q.intd(n), q.todo(n)):
            _unlink(p)

    def after_snapshot(self, msg: Message, snap: Snapshot) -> None:
        """Scheduler thread: the files are durable; catch up with what changed meanwhile."""
        msg.persisted, msg.todo = True, False
        for name, _, where, _ in snap.channels:
            for r, off in where:
                r.offset = off
                if r.done:
                    self._mark(name, msg.id, off)
        if snap.bounces:
            msg.bounce_file = True
        if len(msg.bounces) > snap.bounces:
            self._append_bounce(msg.id, b"".join(msg.bounces[snap.bounces:]))
            msg.bounce_file = True
        msg.bounces.clear()
        for name, ch in msg.channels.items():
            if not ch.pending:
                _unlink(self.q.channel(name, msg.id))

    # -- start-up --------------------------------------------------------------
    def load(self, n: int) -> Message | None:
        """Read a persisted message back (info/N and channel files); None if info is gone."""
        q = self.q
        try:
            with open(q.info(n), "rb") as f:
                birth = os.fstat(f.fileno()).st_mtime
                data = f.read()
        except FileNotFoundError:
            return None
        recs = _records(data) if data.endswith(b"\0") else []
        sender = _text(recs[0][1:]) if recs and recs[0][:1] == b"F" else ""
        try:
            size = os.stat(q.mess(n)).st_size
        except FileNotFoundError:
            size = 0
        msg = Message(n, birth, sender, size, todo=False, persisted=True,
                      bounce_file=os.path.exists(q.bounce(n)))
        for chan in CHANNELS:
            path = q.channel(chan, n)
            try:
                with open(path, "rb") as f:
                    retry = os.fstat(f.fileno()).st_mtime
                    data = f.read()
            except FileNotFoundError:
                continue
            rcpts = []
            off = 0
            for rec in data.split(b"\0"):
                # A record cut short by a crash has no NUL: it is still due.
                if rec[:1] == b"T":
                    rcpts.append(Rcpt(_text(rec[1:]), off))
                off += len(rec) + 1
            if rcpts:
                msg.channels[chan] = Channel(chan, rcpts, retry=retry)
            else:
                _unlink(path)
        return msg

    # -- during delivery -------------------------------------------------------
    def mark_done(self, msg: Message, chan: str, rcpt: Rcpt) -> None:
        """Done in memory; on disk overwrite its `T` with `D` (one byte, no fsync, as qmail)."""
        rcpt.done = True
        msg.progress = True
        if msg.persisted and rcpt.offset is not None:
            self._mark(chan, msg.id, rcpt.offset)

    def _mark(self, chan: str, n: int, offset: int) -> None:
        try:
            fd = os.open(self.q.channel(chan, n), os.O_WRONLY)
        except FileNotFoundError:
            return
        try:
            os.pwrite(fd, b"D", offset)
        finally:
            os.close(fd)

    def set_retry(self, msg: Message, chan: str, when: float) -> None:
        msg.channels[chan].retry = when
        if msg.persisted:
            try:
                os.utime(self.q.channel(chan, msg.id), (when, when))
            except FileNotFoundError:
                pass

    def channel_done(self, msg: Message, chan: str) -> None:
        del msg.channels[chan]
        if msg.persisted:
            _unlink(self.q.channel(chan, msg.id))

    def add_bounce(self, msg: Message, addr: str, report: str) -> None:
        """Record one permanent failure (qmail-send addbounce())."""
        rec = bounce_record(addr, report)
        if msg.persisted:
            self._append_bounce(msg.id, rec)
            msg.bounce_file = True
        else:
            msg.bounces.append(rec)

    def _append_bounce(self, n: int, data: bytes) -> None:
        fd = os.open(self.q.bounce(n), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)

    def bounce_records(self, msg: Message) -> bytes | None:
        data = b""
        if msg.bounce_file:
            try:
                with open(self.q.bounce(msg.id), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                pass
        data += b"".join(msg.bounces)
        return data or None

    def finish(self, msg: Message, room: dict[str, int] | None = None) -> None:
        """The message is done: remove its files in the fixed order (see the module doc).
        Its intd and mess files go to spare/ for new messages to reuse while `room`
        (Queue.spare_room, counted down here) lasts: a file rewritten in place costs
        the filesystem no inode or block to allocate and free, and the disk no discard."""
        q, n = self.q, msg.id
        room = room or {}
        if msg.todo:
            _unlink(q.todo(n))
            _retire(q.intd(n), q.spare_path("i", n), room, "i")
        if msg.persisted:
            for p in (q.bounce(n), q.channel("local", n), q.channel("remote", n), q.info(n)):
                _unlink(p)
        if msg.size <= SPARE_SIZE_MAX and room.get("m", 0) > 0 and _alone(q.mess(n)):
            _retire(q.mess(n), q.spare_path("m", n), room, "m")
        else:
            _unlink(q.mess(n))

    def finish_all(self, msgs: list[Message]) -> list[OSError | None]:
        """finish() each of `msgs` (a worker thread's turn): what each raised, or None."""
        room = self.q.spare_room()
        return each_outcome(lambda msg: self.finish(msg, room), msgs)
