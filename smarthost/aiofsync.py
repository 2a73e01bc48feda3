"""Several fsyncs at once from one thread, with Linux AIO (IOCB_CMD_FSYNC, Linux 4.18+).

A lone commit has two files to fsync, and waiting for them one after the other
costs two cache flushes of the disk; a second thread costs a wake-up of it and
of the caller, each several times a system call here. io_submit hands the
kernel both fsyncs, which its workers run side by side, and io_getevents waits
for both: two system calls. `fsync_all` returns None where that is not to be
had (another architecture or kernel, a seccomp filter): the caller then uses
threads.

`LoopFsyncs` does the same for an event loop that must not wait at all (the
scheduler's fsyncs of new/): the kernel signals an eventfd the loop watches as
each fsync ends, and no Python thread takes part.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import weakref

#: io_setup, io_submit, io_getevents, io_destroy by architecture (asm-generic numbers elsewhere)
_SYSCALLS = {"x86_64": (206, 209, 208, 207), "aarch64": (0, 2, 4, 1), "arm64": (0, 2, 4, 1)}
IOCB_CMD_FSYNC = 2
IOCB_FLAG_RESFD = 1
#: fsyncs one call may submit (a commit has two; a group commit two a message)
MAX_EVENTS = 256


class _Iocb(ctypes.Structure):
    _fields_ = [("aio_data", ctypes.c_uint64), ("aio_key", ctypes.c_uint32),
                ("aio_rw_flags", ctypes.c_int32), ("aio_lio_opcode", ctypes.c_uint16),
                ("aio_reqprio", ctypes.c_int16), ("aio_fildes", ctypes.c_uint32),
                ("aio_buf", ctypes.c_uint64), ("aio_nbytes", ctypes.c_uint64),
                ("aio_offset", ctypes.c_int64), ("aio_reserved2", ctypes.c_uint64),
                ("aio_flags", ctypes.c_uint32), ("aio_resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Context(threading.local):
    ctx: int | None = None   # this thread's aio_context_t, made at first use
    broken = False


_numbers = _SYSCALLS.get(os.uname().machine)
_libc = ctypes.CDLL(None, use_errno=True) if _numbers else None
_local = _Context()


def _setup() -> int | None:
    """A new AIO context for MAX_EVENTS fsyncs under way; None if the kernel will not."""
    ctx = ctypes.c_ulong(0)
    return ctx.value if _libc.syscall(_numbers[0], MAX_EVENTS, ctypes.byref(ctx)) == 0 else None


def _context() -> int | None:
    if _local.ctx is None and not _local.broken:
        _local.ctx = _setup()
        _local.broken = _local.ctx is None
    return _local.ctx


def _submissions(fds: list[int], first_key: int = 0, resfd: int | None = None):
    """The io_submit argument for an fsync of each of `fds`: their iocbs' addresses,
    keyed first_key, first_key + 1, ...; each signals `resfd` (an eventfd) when given."""
    iocbs = (_Iocb * len(fds))()
    ptrs = (ctypes.POINTER(_Iocb) * len(fds))()
    for i, fd in enumerate(fds):
        iocbs[i].aio_data = first_key + i
        iocbs[i].aio_lio_opcode = IOCB_CMD_FSYNC
        iocbs[i].aio_fildes = fd
        if resfd is not None:
            iocbs[i].aio_flags = IOCB_FLAG_RESFD
            iocbs[i].aio_resfd = resfd
        ptrs[i] = ctypes.pointer(iocbs[i])
    return ptrs


def _outcome(res: int) -> OSError | None:
    """An event's result as fsync's: None, or the OSError it failed with."""
    return OSError(-res, os.strerror(-res)) if res < 0 else None


def fsync_all(fds: list[int]) -> list[OSError | None] | None:
    """fsync each of `fds` at once; per descriptor the OSError or None. None when AIO
    fsync is not available here (nothing has been synced then)."""
    if _numbers is None or not 0 < len(fds) <= MAX_EVENTS:
        return None
    ctx = _context()
    if ctx is None:
        return None
    ptrs = _submissions(fds)
    submitted = _libc.syscall(_numbers[1], ctypes.c_ulong(ctx), ctypes.c_long(len(fds)), ptrs)
    if submitted != len(fds):
        if submitted <= 0:
            _local.broken = True  # EINVAL: this kernel has no AIO fsync for these files
            return None
        _wait(ctx, submitted, [None] * len(fds))
        return None  # the rest never went: the caller's fallback syncs all again
    return _wait(ctx, len(fds), [None] * len(fds))


def _wait(ctx: int, count: int, out: list[OSError | None]) -> list[OSError | None]:
    """Wait for `count` submitted fsyncs; their errors in `out`. If the kernel will not
    say how they ended, every one counts as failed (the caller then queues nothing)."""
    events = (_Event * count)()
    got = 0
    while got < count:
        n = _libc.syscall(_numbers[2], ctypes.c_ulong(ctx), ctypes.c_long(count - got),
                          ctypes.c_long(count - got), ctypes.byref(events, got * ctypes.sizeof(_Event)),
                          None)
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            _local.broken = True
            return [OSError(err, os.strerror(err))] * len(out)
        got += n
    for ev in events:
        out[ev.data] = _outcome(ev.res)
    return out


def _destroy(ctx: int, efd: int) -> None:
    _libc.syscall(_numbers[3], ctypes.c_ulong(ctx))
    os.close(efd)


def _forget() -> None:
    _local.ctx = None  # a forked child does not have its parent's contexts


os.register_at_fork(after_in_child=_forget)


class LoopFsyncs:
    """fsyncs an event loop hands the kernel without waiting: each gets a future, done
    when the eventfd the kernel signals (IOCB_FLAG_RESFD) says it has ended."""

    #: fsyncs under way at most; `fsync` declines more (the caller then uses threads)
    DEPTH = MAX_EVENTS

    def __init__(self, loop, ctx: int, efd: int):
        self.loop, self.ctx, self.efd = loop, ctx, efd
        self.pending: dict[int, object] = {}   # aio_data -> its future
        self.next_key = 0
        self.proven = False   # the kernel has taken one: a refusal now is about one file
        self.events = (_Event * 64)()
        # a context left open (its loop closed first) is freed with this object
        self._free = weakref.finalize(self, _destroy, ctx, efd)
        loop.add_reader(efd, self._ended)

    @classmethod
    def open(cls, loop) -> "LoopFsyncs | None":
        """A context and an eventfd watched by `loop`; None where AIO is not to be had."""
        ctx = None if _numbers is None else _setup()
        if ctx is None:
            return None
        try:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            _libc.syscall(_numbers[3], ctypes.c_ulong(ctx))
            return None
        return cls(loop, ctx, efd)

    def fsync(self, fds: list[int]) -> list | None:
        """Start an fsync of each of `fds`: a future each, whose result is None or whose
        exception is the fsync's OSError. None if the kernel would take none of them
        (it has no AIO fsync, or too many are under way): nothing was started then."""
        if self.ctx is None or len(self.pending) + len(fds) > self.DEPTH:
            return None
        ptrs = _submissions(fds, self.next_key, self.efd)
        futs = [self.loop.create_future() for _ in fds]
        done = 0
        while done < len(fds):
            n = _libc.syscall(_numbers[1], ctypes.c_ulong(self.ctx), ctypes.c_long(len(fds) - done),
                              ctypes.byref(ptrs, done * ctypes.sizeof(ctypes.c_void_p)))
            if n > 0:
                for i in range(done, done + n):
                    self.pending[self.next_key + i] = futs[i]
                done += n
                self.proven = True
                continue
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            if not self.proven:
                self.close()  # no AIO fsync here: threads from now on
                return None
            futs[done].set_exception(OSError(err, os.strerror(err)))  # this one file refused
            done += 1
        self.next_key += len(fds)
        return futs

    def _ended(self) -> None:
        """The eventfd says fsyncs have ended: settle the futures of all that have."""
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        self._collect(block=False)

    def _collect(self, block: bool) -> None:
        """Settle the futures of the fsyncs that have ended; with `block`, of all under way."""
        now = _Timespec(0, 0)
        while self.pending:
            least = min(len(self.pending), len(self.events)) if block else 0
            n = _libc.syscall(_numbers[2], ctypes.c_ulong(self.ctx), ctypes.c_long(least),
                              ctypes.c_long(len(self.events)), self.events,
                              None if block else ctypes.byref(now))
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                pending, self.pending = self.pending, {}  # the kernel will not say: all failed
                for fut in pending.values():
                    if not fut.done():
                        fut.set_exception(OSError(err, os.strerror(err)))
                return
            for ev in self.events[:n]:
                fut = self.pending.pop(ev.data, None)
                if fut is None or fut.done():
                    continue
                err = _outcome(ev.res)
                fut.set_result(None) if err is None else fut.set_exception(err)
            if not block and n < len(self.events):
                return

    def close(self) -> None:
        """Stop watching; wait for the fsyncs under way and settle them; free the context."""
        if self.ctx is None:
            return
        self.loop.remove_reader(self.efd)
        self._collect(block=True)
        self._free()
        self.ctx = None
