"""The queue: qmail's layout under ROOT/queue and its crash-safe order (qmail-queue(8), INTERNALS).

This module is the only code that touches ROOT/queue. A message is named by
the inode number N of its mess file; S = N mod split.

State table (what exists for N)                         meaning, and what start-up does
  S1  nothing                                            no message
  S2  mess/S/N (+ intd/N)                                injection under way (its injector holds
                                                         an flock on mess) or dead: cleanup()
                                                         removes it once the lock is free
  S4  mess/S/N + todo/N (+ intd/N; info, channel and    queued (committed): preprocessed again;
      bounce files of a persist that died)               an envelope cut short by a crash (never
                                                         acknowledged) is removed instead
  S5  mess/S/N + info/S/N + local/S/N|remote/S/N        preprocessed and persisted: delivered,
      (+ bounce/N)                                       then removed in the order bounce,
                                                         channels, info, mess

Injection order (each step one create, link or unlink):
  create pid/P (O_EXCL) -> N = its inode; link pid/P -> mess/S/N; unlink pid/P;
  write Received line + message; create intd/N (or find it made ahead, see
  Draft.prepare); write envelope and start its writeback; fsync mess;
  fsync mess/S/ (so the name survives); link intd/N -> todo/N  (the commit point);
  fsync intd/N, fsync todo/ (envelope and link durable; only now is anyone told
  "queued"); poke lock/trigger (see poke: our injectors name what they queued).
The directory fsyncs are coalesced across concurrent injectors (group commit),
and skipped where a file's fsync already commits its links (FSYNC_COVERS_LINKS).
commit_group() takes several staged drafts through each step together (their
fsyncs side by side, where the caller lends it threads), each message in the
order above.
A crash before the todo link leaves S2, which nothing else reads.
"""

from __future__ import annotations

import _thread
import errno
import fcntl
import os
import re
import select
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator

from miniqmail import envelope
from miniqmail.datefmt import date822
from miniqmail.exitcodes import QQ
from miniqmail.fdio import write_all
from smarthost.errors import PermanentError, TemporaryError
from smarthost.fsspread import spread_subdirs

SPLIT_DEFAULT = 23
#: a pid/ file older than this belongs to an injector that died.
PID_STALE_AGE = 60
CHUNK = 65536


FSYNC_COVERS_LINKS = frozenset({"ext3", "ext4", "xfs", "btrfs"})


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding `path`, from /proc/self/mounts ('' if unknown)."""
    try:
        real = os.path.realpath(path if os.path.exists(path) else os.path.dirname(path) or ".")
        with open("/proc/self/mounts") as f:
            mounts = f.read().splitlines()
    except OSError:
        return ""
    best, kind = -1, ""
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        # mount points escape blanks and backslashes as octal (\040)
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:
            best, kind = len(point), fields[2]
    return kind


class QueueError(TemporaryError):
    """Trouble with the queue directory; `exit_code` is qmail-queue's code for it."""


class DirSync:
    """fsync one directory, coalescing concurrent callers (group commit): a caller
    whose change an fsync already covered returns without one of its own.

    Built on _thread, not threading: the delivery spawner imports this module,
    and threading's at-fork hook would cost every delivery child.
    """

    def __init__(self, path: str):
        self.path = path
        self._mutex = _thread.allocate_lock()   # guards the counters
        self._turn = _thread.allocate_lock()    # one fsync at a time
        self._requested = 0
        self._done = 0

    def sync(self) -> None:
        with self._mutex:
            self._requested += 1
            mine = self._requested
        with self._turn:
            with self._mutex:
                if self._done >= mine:
                    return  # an fsync that started after our change has finished
                target = self._requested
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            with self._mutex:
                self._done = max(self._done, target)


@dataclass(frozen=True)
class Injected:
    """What an injection returns: the queue id, and the pid that stands as qmail-queue's (qp)."""

    id: int
    qp: int


def trigger_ids(data: bytes, capacity: int) -> list[int] | None:
    """The ids that lock/trigger's pokes named (Queue.poke), from everything read
    from it at once; None when todo/ must be listed instead: a bare byte (qmail's
    poke), anything malformed, or so much that the fifo may have been full (with
    `capacity` bytes, a poke finding less than PIPE_BUF free may have been lost)."""
    if not data or data[-1:] != b"\n" or len(data) + select.PIPE_BUF > capacity:
        return None
    lines = data[:-1].split(b"\n")
    if not all(line.isdigit() and len(line) <= 20 for line in lines):
        return None
    return [int(line) for line in lines]


def received_line(invoked: str, pid: int | None = None, when: float | None = None) -> bytes:
    """qmail-queue's own Received line: `Received: (qmail P invoked by uid U); DATE`."""
    pid = os.getpid() if pid is None else pid
    return f"Received: (qmail {pid} {invoked}); {date822(when)}\n".encode()


def invoked_by_uid(uid: int | None = None) -> str:
    return f"invoked by uid {os.getuid() if uid is None else uid}"


def _check_address(addr: str) -> bytes:
    raw = addr.encode("utf-8", "surrogateescape")
    if len(raw) > envelope.ADDRESS_MAX:
        raise PermanentError("address too long", exit_code=QQ.ADDRESS_TOO_LONG, status="5.1.3")
    if b"\0" in raw or b"\n" in raw or b"\r" in raw:
        # qmail-queue would take these and let them reach a header or an SMTP
        # dialogue; refusing is the only safe answer.
        raise PermanentError("address contains NUL, CR or LF",
                             exit_code=QQ.PERM_REFUSED, status="5.1.3")
    return raw


class Queue:
    """One queue directory with qmail's layout."""

    def __init__(self, path: str, split: int = SPLIT_DEFAULT):
        #: On these filesystems fsync(2) of a file also commits the links made to it
        #: before (a link changes the inode), so the directory fsyncs are redundant
        #: (ext4 without a journal writes the directory of the file's newest name
        #: instead, which is the mess/S/ or todo/ link that matters here); a busy
        #: scheduler unlinking in the same directories would otherwise turn each
        #: of them into a journal commit of its own.
        self.file_fsync_covers_links = filesystem_type(path) in FSYNC_COVERS_LINKS
        self.path = path
        self.split = split
        self._base = os.path.join(path, "")  # the path with one trailing slash
        self._dirsyncs: dict[str, DirSync] = {}
        self._lock = _thread.allocate_lock()
        self._seq = 0

    # -- layout ------------------------------------------------------------
    def sub(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    # Built by hand: these run several times per message, and os.path.join is slow.
    def split_path(self, kind: str, n: int) -> str:
        return f"{self._base}{kind}/{n % self.split}/{n}"

    def flat_path(self, kind: str, n: int) -> str:
        return f"{self._base}{kind}/{n}"

    def mess(self, n: int) -> str:
        return self.split_path("mess", n)

    def info(self, n: int) -> str:
        return self.split_path("info", n)

    def channel(self, chan: str, n: int) -> str:
        return self.split_path(chan, n)

    def todo(self, n: int) -> str:
        return self.flat_path("todo", n)

    def intd(self, n: int) -> str:
        return self.flat_path("intd", n)

    def bounce(self, n: int) -> str:
        return self.flat_path("bounce", n)

    @property
    def trigger(self) -> str:
        return self.sub("lock", "trigger")

    def create(self) -> None:
        """Make the layout (idempotent): qmail's directories, split dirs, trigger fifo, locks."""
        os.makedirs(self.path, mode=0o750, exist_ok=True)
        spread_subdirs(self.path)  # pid/, intd/, info/...: each its own block group (fsspread)
        for d in ("pid", "intd", "todo", "bounce", "lock"):
            os.makedirs(self.sub(d), mode=0o700, exist_ok=True)
        for d in ("mess", "info", "local", "remote"):
            for s in range(self.split):
                os.makedirs(self.sub(d, str(s)), mode=0o700, exist_ok=True)
        if not os.path.exists(self.trigger):
            os.mkfifo(self.trigger, 0o622)
        for name in ("sendmutex",):
            p = self.sub("lock", name)
            if not os.path.exists(p):
                os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600))

    def check(self) -> None:
        """Refuse to work on something that is not a queue (qmail-queue exit 62)."""
        if not os.path.isdir(self.sub("todo")) or not os.path.isdir(self.sub("mess", "0")):
            raise QueueError(f"{self.path} is not a queue (run smarthost init)", exit_code=QQ.QUEUE)

    def _dirsync(self, path: str) -> None:
        ds = self._dirsyncs.get(path)
        if ds is None:
            with self._lock:
                ds = self._dirsyncs.setdefault(path, DirSync(path))
        ds.sync()

    # -- injection -----------------------------------------------------------
    def inject(self, message: BinaryIO | bytes, sender: str, recipients: Iterable[str], *,
               received: bytes | None = None, uid: int | None = None,
               qp: int | None = None, trigger: bool = True) -> Injected:
        """Queue one message durably; return when it is committed (todo/N fsynced).

        `message` is streamed from its current position. `received` replaces the
        default `Received: (qmail P invoked by uid U)` line (b"" for none).
        Raises PermanentError (exit 11/31) for bad addresses and QueueError with
        qmail-queue's exit code for trouble with the queue; nothing stays visible then.
        """
        sender_raw = _check_address(sender)
        rcpt_raw = [_check_address(r) for r in recipients]
        draft = self.draft()
        try:
            draft.write(received_line(invoked_by_uid(uid), draft.qp if qp is None else qp)
                        if received is None else received)
            draft.write_from(message)
            return draft.commit_raw(sender_raw, rcpt_raw, uid=uid, qp=qp, trigger=trigger)
        finally:
            draft.close()

    def draft(self) -> "Draft":
        """Start an injection whose envelope is known only after the message (qmail-queue's order)."""
        return Draft(self)

    def _new_mess(self) -> tuple[int, str, int]:
        """Create mess/S/N; return N, its path and a descriptor holding an exclusive flock."""
        with self._lock:
            self._seq += 1
            seq = self._seq
        pid_path = self.sub("pid", f"{os.getpid()}.{_thread.get_ident()}.{int(time.time())}.{seq}")
        try:
            fd = os.open(pid_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError as e:
            code = QQ.QUEUE if e.errno == errno.ENOENT else QQ.PID
            raise QueueError(f"unable to create {pid_path}: {e.strerror}", exit_code=code) from None
        try:
            # Locked before it gets its name in mess/: cleanup() skips what is locked.
            fcntl.flock(fd, fcntl.LOCK_EX)
            n = os.fstat(fd).st_ino
            mess_path = self.mess(n)
            try:
                os.link(pid_path, mess_path)
            except OSError as e:
                raise QueueError(f"unable to link mess/{n % self.split}/{n}: {e.strerror}",
                                 exit_code=QQ.MESS) from None
        except BaseException:
            os.close(fd)
            raise
        finally:
            try:
                os.unlink(pid_path)
            except OSError:
                pass
        return n, mess_path, fd

    @staticmethod
    def _write_intd(fd: int, n: int, uid: int | None, qp: int, sender: bytes, rcpts: list[bytes]) -> None:
        """Write the envelope into intd/N's descriptor `fd` (not synced; the caller keeps `fd`)."""
        data = bytearray(b"u%d\0p%d\0F" % (os.getuid() if uid is None else uid, qp))
        data += sender + b"\0"
        for r in rcpts:
            data += b"T" + r + b"\0"
        try:
            write_all(fd, bytes(data))
        except OSError as e:
            raise QueueError(f"unable to write intd/{n}: {e.strerror}", exit_code=QQ.WRITE) from None

    def _create_intd(self, n: int) -> int:
        path = self.intd(n)
        for attempt in (1, 2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                break
            except FileExistsError:
                # Our mess/S/N holds inode N, so an intd/N without todo/N is a
                # leftover of a dead injection of an earlier N: remove it.
                if attempt == 2 or os.path.exists(self.todo(n)):
                    raise QueueError(f"intd/{n} already exists", exit_code=QQ.INTD) from None
                os.unlink(path)
            except OSError as e:
                raise QueueError(f"unable to create intd/{n}: {e.strerror}", exit_code=QQ.INTD) from None
        return fd

    def poke(self, ids: Iterable[int] = ()) -> None:
        """Wake the scheduler through lock/trigger, ignoring every error.

        qmail writes one byte, and the scheduler then lists todo/. With `ids`,
        the messages just committed, this writes `N\\n` for each instead, so
        the scheduler can take them without listing todo/ (trigger_ids). One
        write of at most PIPE_BUF bytes, so that writers never interleave.
        """
        data = b"".join(b"%d\n" % n for n in ids) or b"\0"
        if len(data) > select.PIPE_BUF:
            data = b"\0"
        try:
            fd = os.open(self.trigger, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return
        try:
            os.write(fd, data)
        except OSError:
            pass
        finally:
            os.close(fd)

    # -- scanning -----------------------------------------------------------
    def _numbers(self, directory: str) -> Iterator[int]:
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return
        for name in names:
            if name.isdigit():
                yield int(name)

    def todo_ids(self) -> list[int]:
        return sorted(self._numbers(self.sub("todo")))

    def info_ids(self) -> list[int]:
        out: list[int] = []
        for s in range(self.split):
            out.extend(self._numbers(self.sub("info", str(s))))
        return sorted(out)

    def mess_ids(self) -> list[int]:
        out: list[int] = []
        for s in range(self.split):
            out.extend(self._numbers(self.sub("mess", str(s))))
        return sorted(out)

    def cleanup(self, now: float | None = None, age: float = 0) -> list[int]:
        """qmail-clean's sweep: remove what injections that died left behind.

        A mess/S/N with neither todo/N nor info/N never committed. An injector
        holds an flock on its mess file until the commit, so a mess file we can
        lock that still has no todo/N and no info/N is a leftover: it goes, with
        its intd/N. `age` spares files younger than that many seconds (qmail
        waits 36 h; the lock makes waiting unnecessary). Stale pid/ files go too.
        Returns the removed ids.
        """
        now = time.time() if now is None else now
        removed = []
        for n in self.mess_ids():
            path = self.mess(n)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # an injection is under way
                if os.path.exists(self.todo(n)) or os.path.exists(self.info(n)):
                    continue
                if now - os.fstat(fd).st_mtime < age:
                    continue
                for p in (self.intd(n), path):
                    try:
                        os.unlink(p)
                    except FileNotFoundError:
                        pass
                removed.append(n)
            finally:
                os.close(fd)
        # A pid/ file lives only between its O_EXCL create and the link into mess/,
        # a window in which it is not yet locked: so age, not the lock, decides.
        for name in os.listdir(self.sub("pid")):
            p = self.sub("pid", name)
            try:
                if now - os.stat(p).st_mtime >= max(age, PID_STALE_AGE):
                    os.unlink(p)
            except FileNotFoundError:
                pass
        return removed


def _start_writeback(fd: int) -> None:
    """Start writing `fd`'s dirty pages to the disk without waiting for them: on Linux
    POSIX_FADV_DONTNEED does that (and drops only pages already clean); elsewhere
    it is a hint at most. The fsync that follows still decides durability."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass


class Draft:
    """One injection under way: the message is written first, the envelope commits it.

    Until commit() the entry is invisible to the scheduler; close() without
    commit removes it.
    """

    def __init__(self, queue: Queue):
        self.queue = queue
        self.id, self.path, self._fd = queue._new_mess()
        self.qp = os.getpid()
        self.injected: Injected | None = None  # once committed
        self._done = False
        self._intd_fd = -1

    def prepare(self) -> "Draft":
        """Create intd/N now, empty, for a commit to come: a draft made ahead of its
        message (see QmqpListener's spare) then creates no file once the message is in.
        Like any draft it stays invisible to the scheduler until commit()."""
        if self._intd_fd < 0:
            self._intd_fd = self.queue._create_intd(self.id)
        return self

    def write(self, data: bytes) -> None:
        try:
            write_all(self._fd, data)
        except OSError as e:
            raise QueueError(f"unable to write {self.path}: {e.strerror}", exit_code=QQ.WRITE) from None

    def write_from(self, message: BinaryIO | bytes) -> None:
        if isinstance(message, (bytes, bytearray, memoryview)):
            self.write(bytes(message))
            return
        while True:
            try:
                chunk = message.read(CHUNK)
            except OSError as e:
                raise QueueError(f"unable to read message: {e.strerror}", exit_code=QQ.READ) from None
            if not chunk:
                return
            self.write(chunk)

    def commit(self, sender: str, recipients: Iterable[str], **kw) -> Injected:
        return self.commit_raw(_check_address(sender), [_check_address(r) for r in recipients], **kw)

    def commit_raw(self, sender: bytes, rcpts: list[bytes], *, uid: int | None = None,
                   qp: int | None = None, trigger: bool = True) -> Injected:
        self.stage_raw(sender, rcpts, uid=uid, qp=qp)
        done = self.sync()
        if trigger:
            self.queue.poke((done.id,))
        return done

    # The commit in three steps, so that commit_group() can take several drafts
    # through each step together; commit_raw() is the three in a row.

    def stage(self, sender: str, recipients: Iterable[str], **kw) -> None:
        self.stage_raw(_check_address(sender), [_check_address(r) for r in recipients], **kw)

    def stage_raw(self, sender: bytes, rcpts: list[bytes], *, uid: int | None = None,
                  qp: int | None = None) -> None:
        """Write the envelope into intd/N and start its writeback: it travels to the
        disk while the message's fsync waits, and without todo/N it is invisible all
        the same. Until the commit, trouble leaves intd/N and its descriptor to
        close(), which removes the entry."""
        self.qp = self.qp if qp is None else qp
        self.prepare()
        self.queue._write_intd(self._intd_fd, self.id, uid, self.qp, sender, rcpts)
        _start_writeback(self._intd_fd)

    def sync(self) -> Injected:
        """Commit what stage() prepared; not poked."""
        self.sync_message()
        return self.sync_envelope()

    def sync_message(self) -> None:
        """Make the message and its name durable, then link intd/N -> todo/N (the commit point)."""
        q, n = self.queue, self.id
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise QueueError(f"unable to write {self.path}: {e.strerror}", exit_code=QQ.WRITE) from None
        try:
            if not q.file_fsync_covers_links:
                q._dirsync(os.path.dirname(self.path))
            os.link(q.intd(n), q.todo(n))
        except OSError as e:
            raise QueueError(f"unable to link todo/{n}: {e.strerror}", exit_code=QQ.TODO) from None

    def sync_envelope(self) -> Injected:
        """Make the envelope and the todo/N link durable: only now may anyone be told "queued"."""
        q, n = self.queue, self.id
        # One fsync makes the envelope and (on a journalling filesystem) the link
        # durable in one commit; elsewhere the directory fsync below does it.
        # Until both return nobody has been told "queued": a crash in between can
        # leave a todo/N with an envelope cut short, which start-up removes as a
        # never-acknowledged injection (sendqueue.IncompleteTodo). The descriptor,
        # not the name: once todo/N exists, the scheduler may deliver the message
        # and remove intd/N before this fsync.
        try:
            os.fsync(self._intd_fd)
        except OSError as e:
            try:
                os.unlink(q.todo(n))  # not durable, so not queued; close() removes the rest
            except OSError:
                pass
            raise QueueError(f"unable to sync intd/{n}: {e.strerror}", exit_code=QQ.WRITE) from None
        self._done = True
        self.close()
        if not q.file_fsync_covers_links:
            q._dirsync(q.sub("todo"))
        self.injected = Injected(n, self.qp)
        return self.injected

    def close(self) -> None:
        """Release the entry; without a commit, remove it."""
        if self._intd_fd >= 0:
            os.close(self._intd_fd)
            self._intd_fd = -1
        if self._fd < 0:
            return
        if not self._done:
            for p in (self.queue.intd(self.id), self.path):
                try:
                    os.unlink(p)
                except OSError:
                    pass
        os.close(self._fd)  # releases the lock that kept cleanup() away
        self._fd = -1


def commit_group(drafts: list[Draft], each: Callable = map) -> list[Injected | QueueError]:
    """Commit staged drafts together (group commit): each step for all of them, then
    the next. Each message keeps the order of writes and fsyncs that a lone commit
    has; what the group shares is the waiting (every message's data is on its way
    before the first fsync) and the directory writes (one todo/ write covers the
    links made before it). Nothing is poked. A draft that fails gets its QueueError
    in its place, and the others go on.

    `each(step, drafts)` runs a step for every draft and returns the results in
    order: by default one draft after another. Given a thread pool's map, the
    group's fsyncs wait side by side, and each cache flush of the disk (the
    costly part of an fsync) then serves several of them."""
    for d in drafts:
        _start_writeback(d._fd)
    failed = list(each(_sync_message, drafts))
    return list(each(_sync_envelope, drafts, failed))


def _sync_message(d: Draft) -> QueueError | None:
    try:
        d.sync_message()
    except QueueError as e:
        return e
    return None


def _sync_envelope(d: Draft, failed: QueueError | None) -> Injected | QueueError:
    if failed is not None:
        return failed
    try:
        return d.sync_envelope()
    except QueueError as e:
        return e
