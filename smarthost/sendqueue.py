"""qmail-send's side of the queue: preprocessing todo/N, channel files, done marks, removal.

Formats (INTERNALS, qmail-send.c):
  todo/N      the envelope as qmail-queue wrote it: `u`uid, `p`pid, `F`sender, `T`rcpt, each NUL-ended
  info/S/N    `F`sender NUL; its mtime is the message's birth
  local/S/N   `T`addr NUL per recipient, remote/S/N likewise; a finished recipient's `T`
  remote/S/N  is overwritten in place with `D` (one byte, atomic); the file's mtime is
              the channel's next retry time
  bounce/N    `<addr>:` report paragraphs of permanent failures, appended

todo/N goes when the files it became are durable: at once after an fsync of
them (qmail's way), or — cheaper, and what the scheduler does for mail it can
deliver at once — when the message is finished. A crash before that leaves
todo/N, and the message is preprocessed again (duplicates possible, no loss).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from smarthost.queue import Queue
from smarthost.rewrite import Routing

CHANNELS = ("local", "remote")


class TodoError(ValueError):
    """A todo/N that cannot be understood: left in place and retried later."""


@dataclass
class Channel:
    """One message's recipients on one channel: (record offset, address) still to do."""

    name: str
    pending: list[tuple[int, str]]
    retry: float = 0.0
    busy: int = 0           # deliveries under way in the current pass
    pass_deferred: bool = False


@dataclass
class Message:
    id: int
    birth: float
    sender: str
    size: int = 0
    qp: int = 0
    uid: int = 0
    channels: dict[str, Channel] = field(default_factory=dict)
    todo: bool = False      # todo/N still exists (files not yet made durable)
    bounce: bool = False    # bounce/N holds failure records
    syncing: bool = False   # a worker thread is making its files durable
    finishing: bool = False


def _records(data: bytes) -> list[bytes]:
    if data and not data.endswith(b"\0"):
        raise TodoError("truncated record")
    return data.split(b"\0")[:-1] if data else []


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class SendQueue:
    """File operations of qmail-send on a Queue."""

    def __init__(self, queue: Queue):
        self.q = queue

    # -- todo -> info + channels (qmail-send.c todo_do) ----------------------
    def preprocess(self, n: int, routing: Routing, *, sync: bool) -> Message:
        """Turn todo/N into info/N and channel files; with `sync`, fsync them and drop todo/N."""
        q = self.q
        with open(q.todo(n), "rb") as f:
            data = f.read()
        uid = qp = 0
        sender = None
        rcpts: dict[str, list[str]] = {c: [] for c in CHANNELS}
        for rec in _records(data):
            kind, value = rec[:1], rec[1:]
            if kind == b"u" and value.isdigit():
                uid = int(value)
            elif kind == b"p" and value.isdigit():
                qp = int(value)
            elif kind == b"F" and sender is None:
                sender = _text(value)
            elif kind == b"T":
                chan, addr = routing.route(_text(value))
                rcpts[chan].append(addr)
            elif kind not in (b"u", b"p"):
                raise TodoError(f"unknown record {rec[:20]!r}")
        if sender is None:
            raise TodoError("no sender record")
        try:
            size = os.stat(q.mess(n)).st_size
        except FileNotFoundError:
            raise TodoError("mess file missing") from None
        # Preprocessing again after a crash starts from scratch. Channel and
        # bounce files are always removed before info/N, so without an info/N
        # there is nothing else to remove (one syscall in the usual case).
        try:
            os.unlink(q.info(n))
        except FileNotFoundError:
            pass
        else:
            for p in (q.channel("local", n), q.channel("remote", n), q.bounce(n)):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        fds = []
        try:
            fd = os.open(q.info(n), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            fds.append(fd)
            _write(fd, b"F" + sender.encode("utf-8", "surrogateescape") + b"\0")
            birth = os.fstat(fd).st_mtime
            msg = Message(n, birth, sender, size, qp, uid, todo=True)
            for chan in CHANNELS:
                if not rcpts[chan]:
                    continue
                fd = os.open(q.channel(chan, n), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                fds.append(fd)
                buf = bytearray()
                pending = []
                for addr in rcpts[chan]:
                    pending.append((len(buf), addr))
                    buf += b"T" + addr.encode("utf-8", "surrogateescape") + b"\0"
                _write(fd, bytes(buf))
                msg.channels[chan] = Channel(chan, pending, retry=birth)
            if sync:
                for fd in fds:
                    os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        if sync:
            self.remove_todo(n)
            msg.todo = False
        return msg

    def sync_and_remove_todo(self, msg: Message) -> None:
        """Make info/N and its channel files durable, then drop todo/N."""
        q = self.q
        paths = [q.info(msg.id)] + [q.channel(c, msg.id) for c in msg.channels]
        for p in paths:
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue  # finished meanwhile
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.remove_todo(msg.id)
        msg.todo = False

    def remove_todo(self, n: int) -> None:
        for p in (self.q.intd(n), self.q.todo(n)):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    # -- start-up --------------------------------------------------------------
    def load(self, n: int) -> Message | None:
        """Read a preprocessed message back (info/N and channel files); None if info is gone."""
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
        msg = Message(n, birth, sender, size, bounce=os.path.exists(q.bounce(n)))
        for chan in CHANNELS:
            path = q.channel(chan, n)
            try:
                with open(path, "rb") as f:
                    retry = os.fstat(f.fileno()).st_mtime
                    data = f.read()
            except FileNotFoundError:
                continue
            pending = []
            off = 0
            for rec in data.split(b"\0"):
                # A record cut short by a crash has no NUL: it is still due.
                if rec[:1] == b"T":
                    pending.append((off, _text(rec[1:])))
                off += len(rec) + 1
            if pending:
                msg.channels[chan] = Channel(chan, pending, retry=retry)
            else:
                self.remove_channel(chan, n)
        return msg

    # -- during delivery -------------------------------------------------------
    def mark_done(self, chan: str, n: int, offset: int) -> None:
        """Overwrite the recipient's `T` with `D`: one byte, in place (no fsync, as qmail)."""
        fd = os.open(self.q.channel(chan, n), os.O_WRONLY)
        try:
            os.pwrite(fd, b"D", offset)
        finally:
            os.close(fd)

    def set_retry(self, chan: str, n: int, when: float) -> None:
        try:
            os.utime(self.q.channel(chan, n), (when, when))
        except FileNotFoundError:
            pass

    def remove_channel(self, chan: str, n: int) -> None:
        try:
            os.unlink(self.q.channel(chan, n))
        except FileNotFoundError:
            pass

    def add_bounce(self, n: int, addr: str, report: str) -> None:
        """Record one permanent failure in bounce/N (qmail-send addbounce())."""
        addr = addr.replace("\n", "_")
        lines = [ln if ln.strip() else "/" for ln in report.rstrip("\n").split("\n")]
        text = f"<{addr}>:\n" + "\n".join(lines) + "\n\n"
        fd = os.open(self.q.bounce(n), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        try:
            _write(fd, text.encode("utf-8", "surrogateescape"))
        finally:
            os.close(fd)

    def read_bounce(self, n: int) -> bytes | None:
        try:
            with open(self.q.bounce(n), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def finish(self, msg: Message) -> None:
        """The message is done: remove todo, bounce, channel files, info, then intd and mess.

        That order matters: once mess/S/N is gone the number N is free for a new
        message, and nothing of N may be left to be mistaken for its.
        """
        q, n = self.q, msg.id
        paths = [q.todo(n), q.intd(n)] if msg.todo else []
        if msg.bounce:
            paths.append(q.bounce(n))
        paths += [q.channel(c, n) for c in msg.channels]
        paths += [q.info(n), q.mess(n)]
        for p in paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
