"""mbox delivery as qmail-local(8) does it (mailfile() in qmail-local.c; mbox(5)).

Open for append (creating it 0600), take an exclusive flock within the lock
timeout, remember the size, write `From <sender> <date>`, the caller's prefix
lines (Return-Path, Delivered-To), the message with mboxrd quoting (`>` added
before every line matching `^>*From `), a final LF if the message lacks one,
then one blank line; fsync. A failed write truncates the file back to its old
size, so a reader never sees half a message. The date is qmail's: UTC with a
zero-padded day, which differs from the asctime() that mbox(5) describes.

Messages are streamed a bounded line at a time; a line longer than the read
limit arrives in pieces and only the first piece is a line start.
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import BinaryIO, Iterator

from miniqmail.datefmt import ctime_gmt
from miniqmail.mailbox_error import MailboxError
from miniqmail.fdio import why, write_all

READ_LIMIT = 64 * 1024
WRITE_BUFFER = 64 * 1024
LOCK_POLL = 0.1

_FROM = b"From "


class MboxError(MailboxError):
    """Appending to the mbox failed; the file is as it was, try again later."""


class MboxOpenError(MboxError):
    """The mbox could not be opened or created."""


class MboxLockTimeout(MboxError):
    """Someone else held the lock for the whole timeout."""


class MboxReadError(MboxError):
    """The message being delivered could not be read."""


def from_line(sender: str, when: float | None = None) -> bytes:
    """qmail-local's From_ line, LF included: blanks and LF in the sender become `-`."""
    name = sender.translate({32: "-", 9: "-", 10: "-"}) if sender else "MAILER-DAEMON"
    return f"From {name} {ctime_gmt(when)}\n".encode("utf-8", "surrogateescape")


def quote_from(source: BinaryIO, limit: int = READ_LIMIT) -> Iterator[bytes]:
    """Yield `source` with `>` added before each line matching `^>*From `.

    Reads at most `limit` bytes at a time. A line start made only of `>` so far
    is passed on at once: adding the quote after those `>` is the same as adding
    it before them, so no amount of `>` needs to be held.
    """
    line_start = True  # the next byte starts a line, or only `>` were seen since it did
    carry = b""  # a piece too short to decide, e.g. b"Fro" at a read boundary
    while True:
        chunk = source.readline(limit)
        if not chunk:
            break
        if carry:
            chunk, carry = carry + chunk, b""
        if line_start:
            rest = chunk.lstrip(b">")
            if not rest:
                yield chunk
                continue
            if len(rest) < len(_FROM) and _FROM.startswith(rest):
                head = chunk[: len(chunk) - len(rest)]
                if head:
                    yield head
                carry = rest
                continue
            if rest.startswith(_FROM):
                yield b">"
        yield chunk
        line_start = chunk.endswith(b"\n")
    if carry:
        yield carry


def _lock(fd: int, path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MboxLockTimeout(
                    f"File has been locked for {timeout:g} seconds straight.", path) from None
            time.sleep(min(LOCK_POLL, left))
        except OSError:
            # No flock on this filesystem: qmail-local carries on unlocked.
            return False


def _append(fd: int, path: str, source: BinaryIO, head: bytes) -> None:
    buf = bytearray(head)
    ends_lf = True
    pieces = quote_from(source)
    while True:
        try:
            piece = next(pieces, None)
        except OSError as e:
            raise MboxReadError(f"Unable to read message: {why(e)}.", path, e) from None
        if piece is None:
            break
        buf += piece
        ends_lf = piece.endswith(b"\n")
        if len(buf) >= WRITE_BUFFER:
            write_all(fd, buf)
            buf.clear()
    if not ends_lf:
        buf += b"\n"
    buf += b"\n"
    write_all(fd, buf)
    os.fsync(fd)


def deliver(path: str, source: BinaryIO, *, sender: str, prefix: bytes = b"",
            lock_timeout: float = 30.0, now: float | None = None) -> None:
    """Append one message (from `source`'s current position) to the mbox at `path`.

    Raises MboxError (an OSError): MboxOpenError, MboxLockTimeout, MboxReadError,
    or MboxError itself for a write error, after truncating back to the old size.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o600)
    except OSError as e:
        raise MboxOpenError(f"Unable to open {path}: {why(e)}.", path, e) from None
    try:
        locked = _lock(fd, path, lock_timeout)
        size = os.lseek(fd, 0, os.SEEK_END)
        try:
            _append(fd, path, source, from_line(sender, now) + prefix)
        except BaseException as e:
            # Truncating without the lock could cut another writer's message.
            if locked:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass
            if isinstance(e, OSError) and not isinstance(e, MboxError):
                raise MboxError(f"Unable to write {path}: {why(e)}.", path, e) from None
            raise
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # fsync already succeeded: the message is on disk
