"""The queue: qmail's layout under ROOT/queue and its crash-safe order (qmail-queue(8), INTERNALS).

This module is the only code that touches ROOT/queue. A message is named by
the inode number N of its mess file; S = N mod split.

State table (what exists for N)                         meaning, and what start-up does
  S1  nothing                                            no message
  S2  mess/S/N (+ intd/N)                                injection under way (its injector holds
                                                         an flock on mess) or dead: cleanup()
                                                         removes it once the lock is free
  S4  mess/S/N + todo/N (+ intd/N; info, channel and    queued (committed): preprocessed again;
      bounce files of a persist that died)               an entry whose files a crash cut short
                                                         (never acknowledged) is removed instead
  S5  mess/S/N + info/S/N + local/S/N|remote/S/N        preprocessed and persisted: delivered,
      (+ bounce/N)                                       then removed in the order bounce,
                                                         channels, info, mess

Injection order (each step one create, link, rename or unlink):
  create pid/P (O_EXCL) -> N = its inode; link pid/P -> mess/S/N; unlink pid/P
  (or lock a spare spare/mK and rename it mess/S/N, N = K = its inode);
  write Received line + message (a spare is cut to its length); create intd/N, or
  rename a spare spare/iK to intd/N, K != N (or find it made ahead, see
  Draft.prepare); write the envelope, ending in its check record; link intd/N ->
  todo/N (the commit point); then, side by side, fsync mess, fsync intd (and, where
  a file's fsync does not commit its links, fsync mess/S/ and todo/); only once all
  have returned is anyone told "queued"; poke lock/trigger (see poke: our injectors
  name what they queued).
qmail-queue waits for two cache flushes of the disk in a row: the message's, then
the envelope's, before its link. Here the client waits for one, because a crash in
between is told apart afterwards: the check record (`c<bytes> <crc32 of mess> <crc32
of the envelope before it> <N>`, a record qmail-send skips) says what the message and
the envelope were when committed, so a todo/N whose files a crash cut short is
found and removed as an injection never acknowledged (sendqueue.IncompleteTodo).
The scheduler takes a todo/N only once its injection is over: named by its
injector's poke (sent after the commit), or found in a listing with its mess
file's lock free (see SendQueue.preprocess).
The directory fsyncs are coalesced across concurrent injectors (group commit),
and skipped where a file's fsync already commits its links (FSYNC_COVERS_LINKS).
commit_group() takes several staged drafts through each step together (their
fsyncs side by side: one AIO submission, see run_syncs, or the caller's threads).
A crash before the todo link leaves S2, which nothing else reads.

Spare files: a finished message's intd and mess files are renamed into spare/
(up to SPARES of each; sendqueue's finish), and new messages rewrite them in
place rather than make files: no inode or block is allocated and freed for
them, so no discard goes to the disk and, where ext4 runs without a journal,
no allocation steps past recently freed inodes. A mess file still open elsewhere
(a program a delivery ran may keep it as its standard input) is removed, not kept.
Whatever a crash leaves of a spare is only a spare. A reused file's stale contents
after a crash in the commit window are another message's: the check record's N
and CRC-32s tell them.
"""

from __future__ import annotations

import _thread
import errno
import fcntl
import os
import re
import select
import time
import zlib
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
#: how many of one commit's fsyncs run beside the caller's when nobody lends threads
SIDE_THREADS = 3
#: the mode bit of an intd/N file whose envelope ends in a check record: the inode
#: says so even when a crash left its data block stale (qmail's files have it clear)
CHECKED = 0o100
#: files of each kind spare/ keeps for new messages to reuse (see the module doc)
SPARES = 64
#: a finished message's mess file bigger than this is removed, not kept as a spare
SPARE_SIZE_MAX = 65536


class TornEntry(ValueError):
    """An envelope or message that is not what its check record says: a crash cut it short."""


def check_record(size: int, crc: int, head: bytes, n: int) -> bytes:
    """The envelope's last record: the message's length and CRC-32, the CRC-32 of the
    records before it (`head`), and the message's number N (a reused intd file's
    stale envelope names another message: see Queue._reuse_intd)."""
    return b"c%d %08x %08x %d\0" % (size, crc, zlib.crc32(head), n)


def split_check(data: bytes, required: bool = False,
                n: int | None = None) -> tuple[bytes, tuple[int, int] | None]:
    """An envelope's records before its check record, and the (length, CRC-32) of the
    message it names; (data, None) for an envelope without one (an older queue's).
    TornEntry if the check record is malformed, missing where `required` (the file's
    mode has CHECKED), the records before it differ, or it names a message other
    than `n` (a record without a number, from an older version, names none)."""
    start = data.rfind(b"\0", 0, len(data) - 1) + 1
    last = data[start:-1] if data.endswith(b"\0") else b""
    if last[:1] != b"c":
        if required:
            raise TornEntry("the envelope has lost its check record")
        return data, None
    head = data[:start]
    m = re.fullmatch(rb"c(\d{1,20}) ([0-9a-f]{8}) ([0-9a-f]{8})(?: (\d{1,20}))?", last)
    if m is None or int(m.group(3), 16) != zlib.crc32(head):
        raise TornEntry("the envelope is not what its check record says")
    if n is not None and m.group(4) is not None and int(m.group(4)) != n:
        raise TornEntry("the envelope is another message's")
    return head, (int(m.group(1)), int(m.group(2), 16))


def message_check(fd: int) -> tuple[int, int]:
    """(length, CRC-32) of the message file open at `fd`, read from its start."""
    crc = size = 0
    while chunk := os.pread(fd, CHUNK, size):
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
    return size, crc


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
        self._spare_names: dict[str, list[str]] = {"m": [], "i": []}  # spare/ as last listed

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
        for d in ("pid", "intd", "todo", "bounce", "lock", "spare"):
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

    # -- spare files ------------------------------------------------------------
    def spare_path(self, kind: str, n: int) -> str:
        """spare/mN or spare/iN: the mess or intd file message N had, kept for reuse."""
        return f"{self._base}spare/{kind}{n}"

    def make_spare_dir(self) -> None:
        """spare/ for a queue made before it existed (the scheduler's start); quietly not."""
        try:
            os.mkdir(self.sub("spare"), 0o700)
        except OSError:
            pass

    def spare_room(self) -> dict[str, int]:
        """How many more files of each kind spare/ takes; none where there is no spare/."""
        try:
            names = os.listdir(self.sub("spare"))
        except OSError:
            return {"m": 0, "i": 0}
        return {kind: SPARES - sum(1 for name in names if name[:1] == kind) for kind in ("m", "i")}

    def _spares(self, kind: str) -> Iterator[str]:
        """Names in spare/ of `kind` this process has not tried yet; spare/ is listed
        again (once a call) when none is left. Another injector may take any of them first."""
        listed = False
        while True:
            with self._lock:
                names = self._spare_names[kind]
                if not names and not listed:
                    listed = True
                    try:
                        names.extend(x for x in os.listdir(self.sub("spare")) if x[:1] == kind)
                    except OSError:
                        pass
                if not names:
                    return
                name = names.pop()
            yield name

    def _reuse_mess(self) -> tuple[int, str, int] | None:
        """A spare mess file renamed mess/S/N, as _new_mess returns it; None if none is left."""
        for name in self._spares("m"):
            path = self.sub("spare", name)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue  # another injector took it
            except OSError:
                _unlink_quietly(path)  # not ours to reuse (another user's, a symlink): out of the way
                continue
            try:
                # Locked before it gets its name in mess/, as a new one (cleanup() skips
                # what is locked); a file taken meanwhile is locked, or gone from spare/.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                n = os.fstat(fd).st_ino
                os.rename(path, self.mess(n))
            except OSError:
                os.close(fd)
                continue
            return n, self.mess(n), fd
        return None

    def _reuse_intd(self, n: int) -> int:
        """A spare intd file renamed intd/N, open for writing; -1 if none is left. Never the
        one message N had before: its stale envelope would name N (see check_record)."""
        path = self.intd(n)
        mine = f"i{n}"
        for name in self._spares("i"):
            if name == mine:
                continue
            try:
                os.rename(self.sub("spare", name), path)
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
            except OSError:
                continue  # taken by another injector; or no file to write into: replaced next
            try:
                os.fchmod(fd, 0o600 | CHECKED)  # whatever made it, its next envelope has a check record
            except OSError:
                os.close(fd)
                continue
            return fd
        return -1

    # -- injection: new files --------------------------------------------------
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
            _unlink_quietly(pid_path)
        return n, mess_path, fd

    @staticmethod
    def _write_intd(fd: int, n: int, uid: int | None, qp: int, sender: bytes, rcpts: list[bytes],
                    check: tuple[int, int], reused: bool = False) -> None:
        """Write the envelope into intd/N's descriptor `fd`, its check record last for a
        message of `check` = (length, CRC-32) (not synced; the caller keeps `fd`); a
        `reused` file is cut to the envelope's length."""
        data = bytearray(b"u%d\0p%d\0F" % (os.getuid() if uid is None else uid, qp))
        data += sender + b"\0"
        for r in rcpts:
            data += b"T" + r + b"\0"
        data += check_record(*check, data, n)
        try:
            write_all(fd, bytes(data))
            if reused:
                os.ftruncate(fd, len(data))
        except OSError as e:
            raise QueueError(f"unable to write intd/{n}: {e.strerror}", exit_code=QQ.WRITE) from None

    def _create_intd(self, n: int) -> tuple[int, bool]:
        """intd/N open for writing, and whether it is a reused file (see _reuse_intd)."""
        fd = self._reuse_intd(n)
        if fd >= 0:
            return fd, True
        path = self.intd(n)
        for attempt in (1, 2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600 | CHECKED)
                break
            except FileExistsError:
                # Our mess/S/N holds inode N, so an intd/N without todo/N is a
                # leftover of a dead injection of an earlier N: remove it.
                if attempt == 2 or os.path.exists(self.todo(n)):
                    raise QueueError(f"intd/{n} already exists", exit_code=QQ.INTD) from None
                os.unlink(path)
            except OSError as e:
                raise QueueError(f"unable to create intd/{n}: {e.strerror}", exit_code=QQ.INTD) from None
        return fd, False

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


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


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
        reused = queue._reuse_mess()
        self.id, self.path, self._fd = reused or queue._new_mess()
        self._reused = reused is not None  # a spare's old contents are cut off at stage()
        self.qp = os.getpid()
        self.injected: Injected | None = None  # once committed
        self._done = False
        self._intd_fd = -1
        self._intd_reused = False
        self._size = 0  # what write() has written, for the check record
        self._crc = 0

    def prepare(self) -> "Draft":
        """Create intd/N now, empty, for a commit to come: a draft made ahead of its
        message (see QmqpListener's spare) then creates no file once the message is in.
        Like any draft it stays invisible to the scheduler until commit()."""
        if self._intd_fd < 0:
            self._intd_fd, self._intd_reused = self.queue._create_intd(self.id)
        return self

    def write(self, data: bytes) -> None:
        try:
            write_all(self._fd, data)
        except OSError as e:
            raise QueueError(f"unable to write {self.path}: {e.strerror}", exit_code=QQ.WRITE) from None
        self._size += len(data)
        self._crc = zlib.crc32(data, self._crc)

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
        if self._reused:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError as e:
                raise QueueError(f"unable to write {self.path}: {e.strerror}", exit_code=QQ.WRITE) from None
        self.prepare()
        self.queue._write_intd(self._intd_fd, self.id, uid, self.qp, sender, rcpts,
                               (self._size, self._crc), self._intd_reused)
        _start_writeback(self._intd_fd)

    def sync(self) -> Injected:
        """Commit what stage() prepared and wait until it is durable; not poked."""
        self.link()
        calls = self.syncs()
        return self.settle(calls, run_syncs(calls))

    def link(self) -> None:
        """link intd/N -> todo/N: the commit point (durable once syncs() have run)."""
        q, n = self.queue, self.id
        try:
            os.link(q.intd(n), q.todo(n))
        except OSError as e:
            raise QueueError(f"unable to link todo/{n}: {e.strerror}", exit_code=QQ.TODO) from None

    def syncs(self) -> list[tuple[str, Callable, object]]:
        """What must be durable before anyone is told "queued", as (what, function,
        argument): calls that may run side by side. The descriptors, not the names:
        once todo/N exists, the scheduler may deliver the message and remove its files."""
        q = self.queue
        out: list[tuple[str, Callable, object]] = [
            (self.path, os.fsync, self._fd), (q.intd(self.id), os.fsync, self._intd_fd)]
        if not q.file_fsync_covers_links:
            out += [(os.path.dirname(self.path), q._dirsync, os.path.dirname(self.path)),
                    (q.sub("todo"), q._dirsync, q.sub("todo"))]
        return out

    def settle(self, calls: list[tuple[str, Callable, object]], errors: list[OSError | None]) -> Injected:
        """The commit once `calls` (its syncs()) have run, with what each raised: any
        trouble and todo/N goes (not durable, so not queued; close() removes the rest)."""
        q, n = self.queue, self.id
        for (what, _, _), e in zip(calls, errors):
            if e is not None:
                _unlink_quietly(q.todo(n))
                raise QueueError(f"unable to sync {what}: {e.strerror}", exit_code=QQ.WRITE)
        self._done = True
        self.close()
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
                _unlink_quietly(p)
        os.close(self._fd)  # releases the lock that kept cleanup() away
        self._fd = -1


def commit_group(drafts: list[Draft], each: Callable = map) -> list[Injected | QueueError]:
    """Commit staged drafts together (group commit): link each, then run all their
    syncs at once, then settle each. What the group shares is the waiting (every
    message's data is on its way before the first fsync) and the directory writes
    (one todo/ write covers the links made before it). Nothing is poked. A draft
    that fails gets its QueueError in its place, and the others go on.

    The group's fsyncs wait side by side, and each cache flush of the disk (the
    costly part of an fsync) then serves several of them: plain fsyncs go to the
    kernel in one AIO submission (run_syncs); otherwise `each(step, items)` runs
    them and returns the results in order (by default one after another; given a
    thread pool's map, side by side)."""
    for d in drafts:
        _start_writeback(d._fd)
    out: list[Injected | QueueError | None] = [None] * len(drafts)
    linked: list[tuple[int, list[tuple[str, Callable, object]]]] = []
    for i, d in enumerate(drafts):
        try:
            d.link()
        except QueueError as e:
            out[i] = e
            continue
        linked.append((i, d.syncs()))
    results = iter(run_syncs([c for _, calls in linked for c in calls], each))
    for i, calls in linked:
        try:
            out[i] = drafts[i].settle(calls, [next(results) for _ in calls])
        except QueueError as e:
            out[i] = e
    return out  # type: ignore[return-value]


def run_syncs(calls: list[tuple[str, Callable, object]], each: Callable = None) -> list[OSError | None]:
    """Run Draft.syncs() calls all at once; what each raised, or None. Plain fsyncs go
    to the kernel together by AIO (see smarthost.aiofsync), else `each` runs them
    (side_by_side by default)."""
    if calls and all(fn is os.fsync for _, fn, _ in calls):  # no directory to sync
        from smarthost import aiofsync  # ctypes: only where something is committed
        errors = aiofsync.fsync_all([fd for _, _, fd in calls])  # type: ignore[misc]
        if errors is not None:
            return errors
    return list((each or side_by_side)(_call, calls))


def _call(call: tuple[str, Callable, object]) -> OSError | None:
    """Run one of Draft.syncs(); the OSError it raised, or None."""
    _, fn, arg = call
    try:
        fn(arg)
    except OSError as e:
        return e
    return None


_side_pool = None  # side_by_side()'s threads when the caller lends none, made at first use
_side_lock = _thread.allocate_lock()


def side_by_side(step: Callable, items: list, pool=None) -> list:
    """map(step, items), all at once: the first here, the others in `pool` (a
    concurrent.futures executor; by default a few threads of this process's own).
    A lone commit's fsyncs then wait for one cache flush, not one each in a row."""
    global _side_pool
    if len(items) < 2:
        return [step(x) for x in items]
    if pool is None:
        with _side_lock:
            if _side_pool is None:
                from concurrent.futures import ThreadPoolExecutor
                _side_pool = ThreadPoolExecutor(SIDE_THREADS, thread_name_prefix="queue-fsync")
            pool = _side_pool
    others = [pool.submit(step, x) for x in items[1:]]
    return [step(items[0])] + [f.result() for f in others]


def _forget_side_pool() -> None:
    global _side_pool
    _side_pool = None  # its threads are not in a forked child


os.register_at_fork(after_in_child=_forget_side_pool)
