"""The hand-off: give a finished message to the queue, in process (qmail-qmqpc(8), qmail.c).

On a mini-qmail install the queue is a smart host reached by QMQP: try each
server of control/qmqpservers in order and answer with a qmail-queue(8) exit
code and the `K`/`Z`/`D` report qmail.c gives its callers. `$QMAILQUEUE`
(netqmail's qmail.c) runs that program with the qmail-queue interface instead.

Where qmail-qmqpc fails over only when a connect fails, this moves on to the
next server also after a timeout, a dropped connection, a garbled reply or a
`Z`: a message that may then reach two servers is better than one left with
the sender. A `D` is final.

QMQP sends the message length first, so a message that is not a regular
file is spooled: up to `SPOOL_MEMORY` in memory, beyond that into an
unlinked temporary file, never whole in memory.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from contextlib import closing, suppress
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import miniqmail
from miniqmail import envelope
from miniqmail.control import Control, ControlError
from miniqmail.exitcodes import QQ, is_permanent, report
from miniqmail.qmqp import Letter, Reply, ReplyReader, Request
from miniqmail.qmqpservers import Server, read as read_servers

#: qmail-qmqpc's fixed timeouts, here the defaults of control/timeoutconnect and timeoutremote.
TIMEOUT_CONNECT = 10
TIMEOUT_REMOTE = 60
#: cr.yp.to/proto/qmqp.html: a QMQP session lasts at most an hour.
SESSION_MAX = 3600
#: Messages up to this size are spooled in memory; most mail is far smaller.
SPOOL_MEMORY = 1 << 20
CHUNK = 1 << 16
SENDFILE_CHUNK = 1 << 22


@dataclass(frozen=True)
class HandoffResult:
    """A qmail-queue exit code and the report a caller such as qmail-inject prints."""

    code: int
    text: str

    @property
    def ok(self) -> bool:
        return self.code == 0

    @property
    def permanent(self) -> bool:
        return is_permanent(self.code)

    @classmethod
    def from_code(cls, code: int) -> HandoffResult:
        return cls(int(code), "Kok" if code == 0 else report(code))


class HandoffError(Exception):
    """The hand-off cannot go on; `code` is the qmail-queue exit code that says why."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = int(code)

    def result(self) -> HandoffResult:
        return HandoffResult.from_code(self.code)


@dataclass(frozen=True)
class Settings:
    """What the control files say: the servers in order, and the timeouts in seconds."""

    servers: tuple[Server, ...]
    timeout_connect: int = TIMEOUT_CONNECT
    timeout_remote: int = TIMEOUT_REMOTE


def settings(root: str) -> Settings:
    """The client's control files under `root`; a missing qmqpservers or an unreadable file is 55."""
    control = Control(os.path.join(root, "control"))
    try:
        control.line("me")  # qmail-qmqpc reads it first: unreadable means 55
        servers = read_servers(control)
        connect = control.number("timeoutconnect", TIMEOUT_CONNECT)
        remote = control.number("timeoutremote", TIMEOUT_REMOTE)
    except ControlError as e:
        raise HandoffError(QQ.CONFIG, str(e)) from None
    if servers is None:
        raise HandoffError(QQ.CONFIG, "control/qmqpservers does not exist")
    # A zero would make the socket non-blocking: every attempt would fail at once.
    return Settings(tuple(servers), max(connect, 1), max(remote, 1))


class Body:
    """The message, sized: bytes in memory, or a byte range of a regular file."""

    def __init__(self, length: int, data: bytes | None = None, file: BinaryIO | None = None,
                 offset: int = 0, owned: bool = False):
        self.length = length
        self.data = data
        self.file = file
        self.offset = offset
        self._owned = owned

    def send_to(self, sock: socket.socket, arm: Callable[[], None]) -> None:
        """Write the message to `sock`; `arm` sets the timeout before each write."""
        if self.file is None:
            view = memoryview(self.data or b"")
            for start in range(0, len(view), CHUNK):
                arm()
                sock.sendall(view[start:start + CHUNK])
            return
        offset, left = self.offset, self.length
        while left:
            arm()
            sent = sock.sendfile(self.file, offset, min(left, SENDFILE_CHUNK))
            if not sent:
                raise HandoffError(QQ.READ, "the message file shrank while it was sent")
            offset += sent
            left -= sent

    def close(self) -> None:
        if self._owned and self.file is not None:
            self.file.close()


def _regular_fd(stream: BinaryIO) -> int | None:
    """The descriptor behind `stream` if it is a regular file, else None."""
    try:
        fd = stream.fileno()
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None


def _tmpfile() -> BinaryIO:
    directory = os.environ.get("TMPDIR") or "/tmp"
    try:
        # Linux: a file with no name at all, gone when closed, even after a crash.
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        return os.fdopen(fd, "w+b")
    except (AttributeError, OSError):
        pass
    import tempfile  # off the usual path: it pulls in shutil, random, bz2 and lzma

    try:
        return tempfile.TemporaryFile(dir=directory)
    except OSError as e:
        raise HandoffError(QQ.WRITE, f"cannot create a spool file: {e}") from None


def _read(stream: BinaryIO, size: int) -> bytes:
    try:
        return stream.read(size) or b""
    except OSError as e:
        raise HandoffError(QQ.READ, f"cannot read the message: {e}") from None


def spool(message: BinaryIO) -> Body:
    """Size the message from its current position to its end, spooling it if need be."""
    fd = _regular_fd(message)
    if fd is not None:
        with suppress(OSError):  # if it is not seekable after all, spool it
            offset = message.tell()
            return Body(max(os.fstat(fd).st_size - offset, 0), file=message, offset=offset)
    parts: list[bytes] = []
    total = 0
    while total <= SPOOL_MEMORY:
        chunk = _read(message, CHUNK)
        if not chunk:
            return Body(total, data=b"".join(parts))
        parts.append(chunk)
        total += len(chunk)
    f = _tmpfile()
    try:
        f.write(b"".join(parts))
        del parts
        while chunk := _read(message, CHUNK):
            f.write(chunk)
            total += len(chunk)
        f.flush()
    except BaseException as e:
        f.close()
        if isinstance(e, OSError):  # reads raise HandoffError: this is the spool file
            raise HandoffError(QQ.WRITE, f"cannot spool the message: {e}") from None
        raise
    return Body(total, file=f, offset=0, owned=True)


def check_addresses(sender: str, recipients: list[str] | tuple[str, ...]) -> None:
    """qmail-queue's envelope rules: an address over 1002 bytes is 11; a NUL would break the envelope (91)."""
    for addr in (sender, *recipients):
        raw = addr.encode("utf-8", "surrogateescape")
        if b"\0" in raw:
            raise HandoffError(QQ.ENVELOPE, "address contains a NUL")
        if len(raw) > envelope.ADDRESS_MAX:
            raise HandoffError(QQ.ADDRESS_TOO_LONG, "address too long")


class _NoSocket(Exception):
    """socket() itself failed: a local problem no other server can fix (qmail's 56)."""


def _addresses(server: Server, timeout: float) -> list[tuple[Any, ...]]:
    if server.literal:
        return socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_NUMERICHOST)
    # getaddrinfo cannot be given a timeout; a lookup that hangs is left behind.
    import threading

    box: list[list[tuple[Any, ...]] | OSError] = []

    def lookup() -> None:
        try:
            box.append(socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM))
        except OSError as e:
            box.append(e)

    worker = threading.Thread(target=lookup, name="qmqp-lookup", daemon=True)
    worker.start()
    worker.join(timeout)
    if not box:
        raise TimeoutError(f"lookup of {server.host} timed out")
    if isinstance(box[0], OSError):
        raise box[0]
    return box[0]


def _connect(server: Server, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    last: OSError = ConnectionRefusedError(f"no address for {server.host}")
    for family, kind, proto, _, addr in _addresses(server, timeout):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"connect to {server} timed out")
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as e:
            raise _NoSocket(str(e)) from None
        try:
            sock.settimeout(left)
            sock.connect(addr)
            return sock
        except OSError as e:
            sock.close()
            last = e
    raise last


def _attempt(server: Server, body: Body, request: Request, conf: Settings) -> Reply | int:
    """One server's verdict, or the exit code for how the attempt failed (72, 73, 74)."""
    try:
        sock = _connect(server, conf.timeout_connect)
    except TimeoutError:
        return QQ.CONNECT_TIMEOUT
    except OSError:
        return QQ.CONNECT_REFUSED
    deadline = time.monotonic() + SESSION_MAX

    def arm() -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("QMQP session over its time limit")
        sock.settimeout(min(conf.timeout_remote, left))

    with sock:
        try:
            arm()
            sock.sendall(request.head)
            body.send_to(sock, arm)
            arm()
            sock.sendall(request.tail)
            reader = ReplyReader()
            while True:
                arm()
                data = sock.recv(4096)
                result = reader.feed(data) if data else reader.eof()
                if result is not None:
                    break
        except OSError:  # timeouts included: after connecting, qmail says 74
            return QQ.COMM_FAILED
    return result if isinstance(result, Reply) else QQ.COMM_FAILED


def _answer(reply: Reply, code: int) -> HandoffResult:
    # The server's own words say more than qmail.c's generic text, when it gave any.
    return HandoffResult(code, reply.report() if reply.text.strip() else HandoffResult.from_code(code).text)


def qmqp(body: Body, sender: str, recipients: list[str] | tuple[str, ...], conf: Settings) -> HandoffResult:
    """Send one sized message to the first server of `conf` that takes it."""
    try:
        check_addresses(sender, recipients)
        if not conf.servers:
            return HandoffResult.from_code(QQ.CONFIG)
        request = Request.build(body.length, sender, recipients)
        deferred: Reply | None = None
        failure = int(QQ.CONNECT_REFUSED)
        for server in conf.servers:
            try:
                outcome = _attempt(server, body, request, conf)
            except _NoSocket:
                return HandoffResult.from_code(QQ.NETWORK)
            if isinstance(outcome, int):
                failure = outcome
            elif outcome.letter is Letter.K:
                return _answer(outcome, QQ.OK)
            elif outcome.letter is Letter.D:
                return _answer(outcome, QQ.PERM_REFUSED)
            else:
                deferred = outcome
        if deferred is not None:
            return _answer(deferred, QQ.TEMP_REFUSED)
        return HandoffResult.from_code(failure)
    except HandoffError as e:
        return e.result()


def _qmailqueue(program: str, message: BinaryIO, sender: str, recipients: list[str] | tuple[str, ...],
                root: str) -> HandoffResult:
    """Run `program` as qmail.c runs qmail-queue: message on fd 0, envelope on fd 1, cwd the root."""
    import subprocess
    import threading

    fd = _regular_fd(message)
    if fd is not None:
        try:
            os.lseek(fd, message.tell(), os.SEEK_SET)  # a buffered reader may have read ahead
        except OSError:
            fd = None
    env_read, env_write = os.pipe()
    try:
        proc = subprocess.Popen([program], stdin=subprocess.PIPE if fd is None else fd,
                                stdout=env_read, cwd=root)
    except OSError as e:
        os.close(env_write)
        return HandoffResult.from_code(QQ.HOME if e.filename == root else 120)
    finally:
        os.close(env_read)

    def write_envelope() -> None:
        # Its own thread: the program may read the message first or the envelope first.
        try:
            with open(env_write, "wb") as out:
                out.write(envelope.encode(sender, recipients))
        except OSError:
            pass  # the program quit without reading it; its exit code tells

    writer = threading.Thread(target=write_envelope, name="qmailqueue-envelope", daemon=True)
    writer.start()
    if proc.stdin is not None:
        try:
            while chunk := _read(message, CHUNK):
                proc.stdin.write(chunk)
        except HandoffError as e:
            proc.kill()  # before it sees EOF: a truncated message must never be queued
            proc.wait()
            writer.join()
            return e.result()
        except OSError:
            pass  # it stopped reading; its exit code tells why
        with suppress(OSError):
            proc.stdin.close()
    code = proc.wait()
    writer.join()
    if code < 0:
        return HandoffResult(int(QQ.BUG), report(code))
    return HandoffResult.from_code(code)


def handoff(message: BinaryIO, sender: str, recipients: list[str], *, root: str | None = None) -> HandoffResult:
    """Hand `message` (read from its current position to its end) to the queue.

    Never raises for a mail problem: every outcome is a HandoffResult whose
    code is a qmail-queue(8) exit code and whose text starts with K, Z or D.
    """
    root = miniqmail.root() if root is None else root
    try:
        check_addresses(sender, recipients)
        program = os.environ.get("QMAILQUEUE")
        if program:
            return _qmailqueue(program, message, sender, recipients, root)
        if not os.path.isdir(root):
            return HandoffResult.from_code(QQ.HOME)
        conf = settings(root)
        with closing(spool(message)) as body:
            return qmqp(body, sender, recipients, conf)
    except HandoffError as e:
        return e.result()
    except MemoryError:
        return HandoffResult.from_code(QQ.NOMEM)
