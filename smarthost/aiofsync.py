"""Several fsyncs at once from one thread, with Linux AIO (IOCB_CMD_FSYNC, Linux 4.18+).

A lone commit has two files to fsync, and waiting for them one after the other
costs two cache flushes of the disk; a second thread costs a wake-up of it and
of the caller, each several times a system call here. io_submit hands the
kernel both fsyncs, which its workers run side by side, and io_getevents waits
for both: two system calls. `fsync_all` returns None where that is not to be
had (another architecture or kernel, a seccomp filter): the caller then uses
threads.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading

#: io_setup, io_submit, io_getevents by architecture (asm-generic numbers elsewhere)
_SYSCALLS = {"x86_64": (206, 209, 208), "aarch64": (0, 2, 4), "arm64": (0, 2, 4)}
IOCB_CMD_FSYNC = 2
#: fsyncs one call may submit (a commit has two, four where directories need theirs)
MAX_EVENTS = 8


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


class _Context(threading.local):
    ctx: int | None = None   # this thread's aio_context_t, made at first use
    broken = False


_numbers = _SYSCALLS.get(os.uname().machine)
_libc = ctypes.CDLL(None, use_errno=True) if _numbers else None
_local = _Context()


def _context() -> int | None:
    if _local.ctx is None and not _local.broken:
        ctx = ctypes.c_ulong(0)
        if _libc.syscall(_numbers[0], MAX_EVENTS, ctypes.byref(ctx)) == 0:
            _local.ctx = ctx.value
        else:
            _local.broken = True
    return _local.ctx


def fsync_all(fds: list[int]) -> list[OSError | None] | None:
    """fsync each of `fds` at once; per descriptor the OSError or None. None when AIO
    fsync is not available here (nothing has been synced then)."""
    if _numbers is None or not 0 < len(fds) <= MAX_EVENTS:
        return None
    ctx = _context()
    if ctx is None:
        return None
    iocbs = (_Iocb * len(fds))()
    ptrs = (ctypes.POINTER(_Iocb) * len(fds))()
    for i, fd in enumerate(fds):
        iocbs[i].aio_data = i
        iocbs[i].aio_lio_opcode = IOCB_CMD_FSYNC
        iocbs[i].aio_fildes = fd
        ptrs[i] = ctypes.pointer(iocbs[i])
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
        if ev.res < 0:
            out[ev.data] = OSError(-ev.res, os.strerror(-ev.res))
    return out


def _forget() -> None:
    _local.ctx = None  # a forked child does not have its parent's contexts


os.register_at_fork(after_in_child=_forget)
