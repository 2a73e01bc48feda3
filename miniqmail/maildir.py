"""Maildir delivery and creation, after maildir(5), maildirmake(1) and qmail-local.c.

A message is delivered when its name appears in `new/`. The order that makes a
crash at any instant harmless: create the file in `tmp/`, write, fsync and close
(checking both: NFS reports write errors at close), link it into `new/NAME`, then
fsync `new/` so the link itself survives a crash (qmail and CPython's mailbox.py
skip that last step). Any failure removes what was made and raises MaildirError:
the caller defers and nothing half-written is ever seen. A caller may take that
last fsync upon itself (deliver's `sync`), to do it once for many deliveries.

Where the system can (Linux's O_TMPFILE, with /proc to link it), the file in
`tmp/` has no name until it is linked into `new/`: it cannot collide, a crash
leaves no `tmp/` file to sweep, and its fsync does not also have to write `tmp/`
itself (ext4 without a journal syncs a new file's directory with it). Elsewhere
it is qmail's `tmp/NAME`, created exclusively and unlinked once in `new/`.

Names are `<seconds>.M<usec>P<pid>Q<n>.<host>` (the modern form on
cr.yp.to/proto/maildir.html); `n` counts deliveries in this process, so one
process never reuses a name even within a microsecond.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import stat
import time
from typing import BinaryIO, Callable

from miniqmail.mailbox_error import MailboxError
from miniqmail.fdio import why, write_all

CHUNK = 64 * 1024
CREATE_TRIES = 3

_counter = itertools.count(1)

# link(2) refused because the filesystem has no hard links: rename instead.
_NO_LINK = {errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK}
# fsync(2) on a directory that the filesystem cannot sync: nothing more to do.
NO_DIRSYNC = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}
# open(2) with O_TMPFILE refused: the kernel or the filesystem makes no unnamed files.
_NO_UNNAMED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EISDIR, errno.EINVAL, errno.ENOSYS}
#: Make the file unnamed in tmp/ where the system can; False always uses qmail's tmp/NAME.
UNNAMED = hasattr(os, "O_TMPFILE")
_SELF_FD = "/proc/self/fd"
_self_fd: bool | None = None  # can an unnamed file be linked by its /proc/self/fd name?
# linkat(2) through /proc/self/fd refused, though a named file would do: this
# /proc cannot link (a restricted or odd one); the process stops trying.
_NO_PROC_LINK = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENOTDIR}


#: Makes a new/ link durable, given new/'s open descriptor (valid only during the call).
Sync = Callable[[int], None]


class _ProcCannotLink(Exception):
    """linkat(2) through /proc/self/fd was refused (see _NO_PROC_LINK)."""


class MaildirError(MailboxError):
    """Delivery into a Maildir failed; nothing was left behind, try again later."""


class MaildirMissing(MaildirError):
    """The Maildir itself cannot be entered (qmail-local: "Unable to chdir to maildir")."""


class MaildirReadError(MaildirError):
    """The message being delivered could not be read."""


def _host() -> str:
    host = socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072")


def unique_name() -> str:
    """A fresh Maildir file name: `<seconds>.M<usec>P<pid>Q<n>.<host>`."""
    sec, usec = divmod(time.time_ns() // 1000, 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{next(_counter)}.{_host()}"


def make(path: str, mode: int = 0o700) -> None:
    """Create a Maildir (dir, tmp, new, cur) like maildirmake: fail if `path` exists."""
    os.mkdir(path, mode)
    for sub in ("tmp", "new", "cur"):
        os.mkdir(os.path.join(path, sub), mode)


def _check_dir(maildir: str) -> None:
    try:
        st = os.stat(maildir)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
        raise MaildirMissing(f"maildir not found: {maildir}: {why(e)}", maildir, e) from None
    except OSError as e:
        raise MaildirError(f"unable to stat maildir {maildir}: {why(e)}", maildir, e) from None
    if not stat.S_ISDIR(st.st_mode):
        raise MaildirMissing(f"maildir not found: {maildir}: not a directory", maildir)


def _create_tmp(maildir: str) -> tuple[str, str, int]:
    for attempt in range(CREATE_TRIES):
        name = unique_name()
        tmp = os.path.join(maildir, "tmp", name)
        try:
            return name, tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError as e:
            # Names are unique per process; a clash means a stale file or a clock step back.
            if attempt == CREATE_TRIES - 1:
                raise MaildirError(f"unable to create a unique name in {maildir}/tmp", tmp, e) from None
        except OSError as e:
            raise MaildirError(f"unable to create {tmp}: {why(e)}", tmp, e) from None
    raise AssertionError("unreachable")


def _sendfile(fd: int, source: BinaryIO) -> bool:
    """Copy the rest of `source` with sendfile(2): no buffers, no copies through
    Python. False (nothing written) when the source is not a plain file."""
    try:
        src = source.fileno()
        pos = source.tell()
        end = os.fstat(src).st_size
    except (AttributeError, OSError, ValueError):
        return False
    if not stat.S_ISREG(os.fstat(src).st_mode):
        return False
    offset = pos
    while offset < end:
        try:
            sent = os.sendfile(fd, src, offset, end - offset)
        except OSError as e:
            if offset == pos and e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return False
            raise
        if sent == 0:
            break
        offset += sent
    source.seek(offset)
    return True


def _copy(fd: int, tmp: str, source: BinaryIO, prefix: bytes) -> None:
    try:
        if prefix:
            write_all(fd, prefix)
        if not _sendfile(fd, source):
            while True:
                try:
                    chunk = source.read(CHUNK)
                except OSError as e:
                    raise MaildirReadError(f"unable to read message: {why(e)}", tmp, e) from None
                if not chunk:
                    break
                write_all(fd, chunk)
        os.fsync(fd)
    except MaildirError:
        raise
    except OSError as e:
        raise MaildirError(f"unable to write {tmp}: {why(e)}", tmp, e) from None


def _publish(tmp: str, new: str) -> None:
    try:
        os.link(tmp, new)
    except OSError as e:
        if e.errno not in _NO_LINK:
            raise MaildirError(f"unable to link {tmp} to {new}: {why(e)}", new, e) from None
        try:
            os.rename(tmp, new)
        except OSError as e2:
            raise MaildirError(f"unable to rename {tmp} to {new}: {why(e2)}", new, e2) from None
        return
    try:
        os.unlink(tmp)
    except OSError:
        pass  # the message is already in new/; a stray tmp file is swept after 36 hours


def fsync_dir(dfd: int) -> None:
    """fsync an open directory; a filesystem that cannot sync directories needs nothing more."""
    try:
        os.fsync(dfd)
    except OSError as e:
        if e.errno not in NO_DIRSYNC:
            raise


def _sync_dir(path: str, new: str, dfd: int | None = None, sync: Sync | None = None) -> None:
    """Make the link `new` in directory `path` durable: `sync` (fsync_dir by default) with
    an open descriptor of `path` (`dfd`, else opened here); on failure withdraw `new`."""
    sync = sync or fsync_dir
    try:
        if dfd is not None:
            sync(dfd)
            return
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            sync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        # Not known to be durable: withdraw it so the deferral does not become a duplicate.
        try:
            os.unlink(new)
        except OSError:
            pass
        raise MaildirError(f"unable to sync {path}: {why(e)}", path, e) from None


def _create_unnamed(maildir: str) -> int | None:
    """A file in tmp/ without a name (O_TMPFILE), or None where the system makes
    none or could not link it into new/ afterwards."""
    global _self_fd
    if not UNNAMED:
        return None
    if _self_fd is None:
        _self_fd = os.path.isdir(_SELF_FD)
    if not _self_fd:
        return None
    tmp = os.path.join(maildir, "tmp")
    try:
        return os.open(tmp, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno in _NO_UNNAMED:
            return None
        raise MaildirError(f"unable to create a file in {tmp}: {why(e)}", tmp, e) from None


def _deliver_unnamed(maildir: str, fd: int, source: BinaryIO, prefix: bytes, sync: Sync | None) -> str:
    """Write and sync the unnamed file `fd`, then link it into new/ under a fresh name
    and sync new/. On failure nothing is left: an unnamed file vanishes with its last
    descriptor, which the caller closes."""
    _copy(fd, os.path.join(maildir, "tmp"), source, prefix)
    newdir = os.path.join(maildir, "new")
    try:
        dfd = os.open(newdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise MaildirError(f"unable to open {newdir}: {why(e)}", newdir, e) from None
    try:
        for attempt in range(CREATE_TRIES):
            name = unique_name()
            try:
                # dst_dir_fd makes this linkat(2), which follows the /proc link to the file.
                os.link(f"{_SELF_FD}/{fd}", name, dst_dir_fd=dfd, follow_symlinks=True)
                break
            except FileExistsError as e:
                # Names are unique per process; a clash means a clock step back.
                if attempt == CREATE_TRIES - 1:
                    raise MaildirError(f"unable to find a unique name in {newdir}", newdir, e) from None
            except OSError as e:
                if e.errno in _NO_PROC_LINK and os.path.isdir(newdir):
                    raise _ProcCannotLink() from None
                raise MaildirError(f"unable to link into {newdir}: {why(e)}", newdir, e) from None
        _sync_dir(newdir, os.path.join(newdir, name), dfd, sync)
    finally:
        os.close(dfd)
    return name


def deliver(maildir: str, source: BinaryIO, prefix: bytes = b"", sync: Sync | None = None) -> str:
    """Write `prefix` then `source` (from its current position) into `maildir`; return NAME.

    The message is streamed in CHUNK-sized pieces, never held whole. Raises
    MaildirError (an OSError) on any failure, with no file left in tmp/ or new/.
    `sync` makes the new/ link durable (default: fsync_dir, here and now); a
    caller that fsyncs new/ later, once for many deliveries, passes its own and
    must not count the message delivered before then.
    """
    global _self_fd
    _check_dir(maildir)
    fd = _create_unnamed(maildir)
    if fd is not None:
        try:
            try:
                return _deliver_unnamed(maildir, fd, source, prefix, sync)
            except _ProcCannotLink:
                # Written and synced, but it cannot be given a name: copy it into
                # qmail's named tmp/ file, as every later delivery of this process will.
                _self_fd = False
                os.lseek(fd, 0, os.SEEK_SET)
                with open(fd, "rb", closefd=False) as written:
                    return _deliver_named(maildir, written, b"", sync)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass  # after its fsync (O_TMPFILE means a local filesystem), nothing to lose
    return _deliver_named(maildir, source, prefix, sync)


def _deliver_named(maildir: str, source: BinaryIO, prefix: bytes, sync: Sync | None) -> str:
    """qmail's way: tmp/NAME created exclusively, written, synced, linked into new/."""
    name, tmp, fd = _create_tmp(maildir)
    new = os.path.join(maildir, "new", name)
    try:
        try:
            _copy(fd, tmp, source, prefix)
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise
        try:
            os.close(fd)
        except OSError as e:
            raise MaildirError(f"unable to write {tmp}: {why(e)}", tmp, e) from None
        _publish(tmp, new)
        _sync_dir(os.path.join(maildir, "new"), new, sync=sync)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return name
