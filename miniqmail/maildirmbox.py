"""Moving a Maildir's messages into an mbox, as maildir2mbox(1) does (qmail's maildir2mbox.c).

The order that loses nothing at any instant, qmail's:

  1. lock MAIL (flock, lockf where flock is missing), creating it 0600, and
     list the messages while holding the lock;
  2. copy MAIL into MAILTMP, which must be on the same filesystem;
  3. append every message of new/ and cur/, oldest first, as mbox entries;
  4. flush, fsync and close MAILTMP, checking each;
  5. rename MAILTMP over MAIL (and, beyond qmail, fsync MAIL's directory);
  6. only then unlink the messages.

Up to step 5 MAIL is untouched and every message is still in the Maildir;
a failure removes MAILTMP and changes nothing else. After step 5 a message
that cannot be unlinked is reported: it will be delivered twice, never lost.
Signals are held off during steps 5 and 6 so an interruption cannot split
them. Beyond qmail, two runs at once are safe: one that waited for the lock
checks that MAIL is still the file it locked, and lists the Maildir only
then; and the new MAIL is locked before its rename until step 6 is done, so
one that opens it meanwhile waits. The new MAIL keeps the old one's owner
(when allowed) and mode.

Each entry is `From ADDR DATE`: ADDR from a first line `Return-Path: <ADDR>`
(`MAILER-DAEMON` for `<>`, blanks become `-`), else `XXX`; DATE is the
file's modification time in qmail's From_ format. The message follows with
`>` added before every line matching `^>*From `, an LF after a partial last
line, and a blank line. Messages and MAIL are streamed, never held whole.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import signal
import stat
import time
from typing import Any, BinaryIO, Callable, Iterator

from miniqmail.maildirscan import Entry, ScanError, clean, scan
from miniqmail.mbox import from_line, quote_from
from miniqmail.fdio import why

CHUNK = 1 << 20
#: the longest first line read when looking for Return-Path; a longer one is an ordinary line.
FIRST_LINE_LIMIT = 64 * 1024
RETURN_PATH = b"Return-Path: <"
_HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Maildir2mboxError(Exception):
    """The conversion stopped before the rename: MAIL and the Maildir are as they were."""


def sender_of(first_line: bytes) -> str:
    """The From_ address for a message whose first line (LF included) is `first_line`."""
    if not first_line.startswith(RETURN_PATH) or not first_line.endswith(b"\n"):
        return "XXX"
    addr = first_line[len(RETURN_PATH):].rstrip(b"\r\n")
    if addr.endswith(b">"):
        addr = addr[:-1]
    # from_line() turns blanks into `-` and an empty address into MAILER-DAEMON.
    return addr.decode("utf-8", "surrogateescape")


def write_entry(out: BinaryIO, message: BinaryIO, mtime: int) -> None:
    """Append one message from `message` (at its start) to `out` as an mbox entry."""
    first = message.readline(FIRST_LINE_LIMIT)
    out.write(from_line(sender_of(first), mtime))
    message.seek(0)
    ends_lf = True
    for piece in quote_from(message):
        out.write(piece)
        ends_lf = piece.endswith(b"\n")
    out.write(b"\n" if ends_lf else b"\n\n")


def _lock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        fcntl.lockf(fd, fcntl.LOCK_EX)  # no flock here (some NFS): POSIX locks instead


class _MessageFile(io.FileIO):
    """A message file whose read errors say which file failed (write errors are MAILTMP's)."""

    def readinto(self, buffer: Any) -> int:
        try:
            return super().readinto(buffer)
        except OSError as e:
            raise Maildir2mboxError(f"unable to read {self.name}: {why(e)}") from None


def _copy(src: int, src_name: str, dst: BinaryIO) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        try:
            n = os.readv(src, [buf])
        except OSError as e:
            raise Maildir2mboxError(f"unable to read {src_name}: {why(e)}") from None
        if not n:
            return
        dst.write(view[:n])


def _sync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or "/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _locked(path: str) -> int:
    """`path` open and locked; OSError if not."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        _lock(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_locked(mail: str) -> int:
    """Step 1: MAIL open for reading and writing, locked, and still the file named MAIL.

    Another maildir2mbox may rename a new mbox over MAIL while this one waits
    for the lock; the file it then holds is no longer the mbox, so start again.
    """
    while True:
        try:
            fd = os.open(mail, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise Maildir2mboxError(f"unable to lock {mail}: {why(e)}") from None
        try:
            _lock(fd)
            held = os.fstat(fd)
            try:
                named = os.stat(mail)
            except FileNotFoundError:
                named = None
        except OSError as e:
            os.close(fd)
            raise Maildir2mboxError(f"unable to lock {mail}: {why(e)}") from None
        if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)


def _build(mail: str, old: int, mailtmp: str, entries: list[Entry]) -> list[Entry]:
    """Steps 2 to 4: MAILTMP = MAIL (read from `old`) + the entries, on disk; return the
    entries written (a message renamed away meanwhile is left for the next run).
    Removes MAILTMP on failure."""
    written = []
    mail_st = os.fstat(old)
    try:
        tmp_st = os.stat(mailtmp)
    except OSError:
        tmp_st = None
    if tmp_st is not None and (tmp_st.st_dev, tmp_st.st_ino) == (mail_st.st_dev, mail_st.st_ino):
        raise Maildir2mboxError(f"$MAILTMP names $MAIL itself: {mailtmp}")
    try:
        fd = os.open(mailtmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise Maildir2mboxError(f"unable to create {mailtmp}: {why(e)}") from None
    try:
        with open(fd, "wb", buffering=CHUNK, closefd=False) as out:
            os.lseek(old, 0, os.SEEK_SET)
            _copy(old, mail, out)
            for entry in entries:
                try:
                    raw = _MessageFile(entry.path, "rb")
                except FileNotFoundError:
                    continue  # a mail reader moved it, e.g. from new/ to cur/
                except OSError as e:
                    raise Maildir2mboxError(f"unable to read {entry.path}: {why(e)}") from None
                with io.BufferedReader(raw, CHUNK) as message:
                    write_entry(out, message, entry.mtime)
                written.append(entry)
        # Keep the mbox's own owner and permissions across the rename.
        with contextlib.suppress(PermissionError):
            os.fchown(fd, mail_st.st_uid, mail_st.st_gid)
        os.fchmod(fd, stat.S_IMODE(mail_st.st_mode))
        os.fsync(fd)
    except BaseException as e:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(mailtmp)
        if isinstance(e, OSError):
            raise Maildir2mboxError(f"unable to write to {mailtmp}: {why(e)}") from None
        raise
    try:
        os.close(fd)  # NFS reports write errors at close
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(mailtmp)
        raise Maildir2mboxError(f"unable to write to {mailtmp}: {why(e)}") from None
    return written


def maildir2mbox(maildir: str, mail: str, mailtmp: str, now: float | None = None,
                 warn: Callable[[str], None] = lambda text: None) -> int:
    """Move every settled message of `maildir` into the mbox `mail`; return how many moved.

    Raises Maildir2mboxError (nothing changed) or ScanError (the Maildir cannot
    be read). Messages that moved but could not be unlinked are passed to `warn`.
    """
    now = time.time() if now is None else now
    try:
        os.listdir(maildir)
    except OSError as e:
        raise ScanError(f"unable to chdir to {maildir}: {why(e)}", maildir) from None
    clean(maildir, now)
    if not scan(maildir, ("new", "cur"), before=now):
        return 0  # nothing new: MAIL is not even created
    lock = _open_locked(mail)
    try:
        # Again under the lock: a maildir2mbox that held it may have taken them.
        entries = scan(maildir, ("new", "cur"), before=now)
        if not entries:
            return 0
        entries = _build(mail, lock, mailtmp, entries)
        if not entries:  # every one was moved away while MAILTMP was written
            with contextlib.suppress(OSError):
                os.unlink(mailtmp)
            return 0
        # A MAIL that is a symlink stays one: the file it points to is replaced.
        target = os.path.realpath(mail)
        # Locked before it becomes MAIL, until its messages are unlinked: another
        # maildir2mbox that opens the new MAIL meanwhile must not take them again.
        try:
            new_lock = _locked(mailtmp)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(mailtmp)
            raise Maildir2mboxError(f"unable to lock {mailtmp}: {why(e)}") from None
        try:
            with _signals_held():
                try:
                    os.rename(mailtmp, target)
                except OSError as e:
                    with contextlib.suppress(OSError):
                        os.unlink(mailtmp)
                    raise Maildir2mboxError(f"unable to move {mailtmp} to {target}: {why(e)}") from None
                try:
                    _sync_dir(target)
                except OSError as e:
                    # The new mbox may not survive a crash: keep the messages rather than risk them.
                    warn(f"unable to sync the directory of {mail}: {why(e)}; "
                         f"the messages stay in $MAILDIR and will be delivered twice")
                    return len(entries)
                for entry in entries:
                    try:
                        os.unlink(entry.path)
                    except FileNotFoundError:
                        pass  # someone else removed it: it is in the mbox all the same
                    except OSError as e:
                        warn(f"{entry.path} will be delivered twice; unable to unlink: {why(e)}")
        finally:
            os.close(new_lock)
    finally:
        os.close(lock)
    return len(entries)
