"""The QMQP server side (cr.yp.to/proto/qmqp.html, qmail-qmqpd(8), qmail-qmqpd.c), with no I/O.

A request is one netstring holding netstring(message), netstring(sender) and
netstring(recipient)...; the answer is one netstring starting K, Z or D.
`QmqpSession` is fed the bytes a client sent, in any chunking, and streams the
message to a sink as it arrives, so a message is never held whole. `feed()`
returns NEED_DATA, a `Request` (queue it and answer K), or a `Refused` (answer
its D text, queue nothing), or raises `QmqpError`: a protocol error gets no
answer at all, as from qmail-qmqpd. Bytes after the request are never
consumed; they are left in `unused`.

Budgets (qmail-qmqpd.c): the whole request is at most REQUEST_MAX bytes,
declared up front; every inner netstring must fit in what the outer one
declared; an address of ADDRESS_MAX bytes or more, or with NUL, is refused with
`D... (#5.1.3)` once the request is read.

Where qmail-qmqpd is more lenient, and we are not:
  * lengths follow our strict netstring codec: no leading zeros, no empty
    length, digits only (qmail-qmqpd takes `040:`, reads `:` as 0, and
    1.03 does not check for digits at all);
  * an address with CR or LF is refused like one with NUL (qmail-qmqpd would
    let it reach headers and SMTP dialogues later);
  * zero recipients is refused with a D answer (qmail-qmqpd queues such a
    message, which can only bounce or vanish);
  * `databytes`, when set, bounds the whole request: the request is read and
    thrown away, then refused with D #5.3.4 (qmail-qmqpd has no databytes).
    Draining rather than closing at once matters: a QMQP client sends the
    whole request before it reads, so an early close reaches it as a broken
    connection, a temporary failure retried until the queue lifetime.

`QueueSink` is the queue end of a session: it writes the streamed message into
a draft it is handed a way to open, and turns the outcome into the answer
text. It does no I/O of its own; the draft does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from miniqmail import netstring
from miniqmail.datefmt import date822
from miniqmail.exitcodes import report
from miniqmail.netstring import Decoder, LengthParser, NetstringError, TooLong
from smarthost.errors import SmarthostError

#: qmail-qmqpd gives up (exit 111) once a length passes 200,000,000.
REQUEST_MAX = 200_000_000
#: qmail-qmqpd's getbuf(): an address of 1000 bytes or more is refused.
ADDRESS_MAX = 1000
#: qmail-qmqpd's alarm(3600): the most a whole session may take.
SESSION_MAX = 3600

BAD_ADDRESS = "Dsorry, I can't accept addresses like that (#5.1.3)"
NO_RECIPIENTS = "Dsorry, I need at least one recipient (#5.5.1)"
TOO_BIG = "Dsorry, that message size exceeds my databytes limit (#5.3.4)"


class QmqpError(ValueError):
    """A protocol error: the connection ends with no answer (qmail-qmqpd exits 100)."""

    exit_code = 100


class TooLarge(QmqpError):
    """A declared length over the hard limit (qmail-qmqpd's resources(): exit 111)."""

    exit_code = 111


class Truncated(QmqpError):
    """The input ended inside the request: the client gave up (qmail-qmqpd exits 0)."""

    exit_code = 0


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True)
class Request:
    """The whole request arrived and may be queued."""

    sender: bytes
    recipients: tuple[bytes, ...]
    message_bytes: int


@dataclass(frozen=True)
class Refused:
    """The whole request arrived and must not be queued; `answer` is the D text."""

    answer: str


Event = _NeedData | Request | Refused

# States of the session.
_OUTER, _MESSAGE, _SENDER, _RCPT, _DRAIN, _COMMA, _DONE, _FAILED = range(8)


class QmqpSession:
    """One QMQP request, parsed incrementally; `sink(bytes)` receives the message."""

    def __init__(self, sink: Callable[[bytes], object], databytes: int = 0,
                 request_max: int = REQUEST_MAX, address_max: int = ADDRESS_MAX):
        self.sink = sink
        self.databytes = databytes
        self.address_max = address_max
        self._outer = LengthParser(max(request_max, databytes))
        self._state = _OUTER
        self._left = 0                      # bytes of the outer netstring still to come
        self._dec: Decoder | None = None    # the inner netstring being read
        self._addr = bytearray()
        self._bad_address = False
        self._oversize = False
        self._sender = b""
        self._recipients: list[bytes] = []
        self._result: Event = NEED_DATA
        self._error: QmqpError | None = None
        self.message_bytes = 0
        #: every byte fed after the request's last comma (never parsed)
        self.unused = b""

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> Event:
        """Take the next bytes from the client; the outcome so far."""
        if self._state == _DONE:
            self.unused += data
            return self._result
        if self._error is not None:
            raise self._error
        try:
            pos = self._run(memoryview(data))
        except NetstringError as e:
            # Only the outer length is a resource limit; an inner one too long
            # for the request is a broken request.
            outer = isinstance(e, TooLong) and self._state == _OUTER
            raise self._fail((TooLarge if outer else QmqpError)(str(e))) from None
        except QmqpError as e:
            raise self._fail(e) from None
        if self._state == _DONE:
            self.unused = bytes(data[pos:])
        return self._result

    def feed_eof(self) -> Event:
        """The client closed its side: the outcome, or Truncated."""
        if self._state == _DONE:
            return self._result
        if self._error is not None:
            raise self._error
        raise self._fail(Truncated("end of input inside the request"))

    def _fail(self, error: QmqpError) -> QmqpError:
        self._state = _FAILED
        self._error = error
        return error

    def _run(self, view: memoryview) -> int:
        pos, end = 0, len(view)
        while pos < end and self._state != _DONE:
            state = self._state
            if state == _OUTER:
                n = self._outer.feed(view[pos])
                pos += 1
                if n is not None:
                    self._left = n
                    if self.databytes and n > self.databytes:
                        self._oversize = True
                        self._state = _DRAIN
                    else:
                        self._start(_MESSAGE)
            elif state == _DRAIN:
                k = min(self._left, end - pos)
                pos += k
                self._left -= k
                if not self._left:
                    self._state = _COMMA
            elif state == _COMMA:
                if view[pos] != 0x2C:
                    raise QmqpError("request does not end with a comma")
                pos += 1
                self._finish()
            else:
                pos += self._inner(view[pos:pos + min(self._left, end - pos)])
        return pos

    def _start(self, state: int) -> None:
        if not self._left:
            if state == _RCPT:
                self._state = _COMMA
                return
            # qmail-qmqpd: the message and the sender must both be there.
            raise QmqpError("request ends before its sender")
        self._state = state
        self._dec = Decoder(self._left)
        self._addr = bytearray()

    def _inner(self, chunk: memoryview) -> int:
        dec = self._dec
        assert dec is not None
        used = dec.feed(chunk)  # type: ignore[arg-type]
        self._left -= used
        pieces = dec.take()
        if self._state == _MESSAGE:
            for piece in pieces:
                self.message_bytes += len(piece)
                self.sink(piece)
        elif dec.length is not None and dec.length >= self.address_max:
            self._bad_address = True  # drained, never kept
        else:
            for piece in pieces:
                self._addr += piece
        if dec.done:
            if self._state == _MESSAGE:
                self._start(_SENDER)
                return used
            addr = bytes(self._addr)
            if b"\0" in addr or b"\n" in addr or b"\r" in addr:
                self._bad_address = True
            if self._state == _SENDER:
                self._sender = addr
            elif not self._bad_address:
                self._recipients.append(addr)
            self._start(_RCPT)
        elif dec.length is None:
            if not self._left:
                raise QmqpError("netstring length runs past the end of the request")
        elif dec.remaining + 1 > self._left:
            # Found as soon as the length is known, not after streaming it all.
            raise QmqpError("netstring runs past the end of the request")
        return used

    def _finish(self) -> None:
        self._state = _DONE
        if self._oversize:
            self._result = Refused(TOO_BIG)  # drained unread
        elif self._bad_address:
            self._result = Refused(BAD_ADDRESS)
        elif not self._recipients:
            self._result = Refused(NO_RECIPIENTS)
        else:
            self._result = Request(self._sender, tuple(self._recipients), self.message_bytes)


def databytes(value: str | None) -> int:
    """DATABYTES read as qmail-smtpd reads it: the leading digits; 0 (no limit) when there are none."""
    text = (value or "").strip()
    end = 0
    while end < len(text) and "0" <= text[end] <= "9":
        end += 1
    return int(text[:end]) if end else 0


def answer(text: str) -> bytes:
    """The answer netstring for `text` (K..., Z... or D...)."""
    return netstring.encode(text.encode("utf-8", "surrogateescape"))


def ok_text(qp: int, when: float | None = None) -> str:
    """qmail-qmqpd's success text: `Kok <unixtime> qp <pid>`."""
    return f"Kok {int(time.time() if when is None else when)} qp {qp}"


_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.@%+/=:-")
_SAFE_TABLE = bytes(b if b in _SAFE else 63 for b in range(256))  # 63: '?'


def safe(value: str | bytes) -> str:
    """received.c's safeput(): bytes other than letters, digits and `.@%+/=:-` become `?`."""
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return raw.translate(_SAFE_TABLE).decode("ascii")


def received(protocol: str, local: str | None, remoteip: str | None, remotehost: str | None,
             remoteinfo: str | None = None, helo: str | None = None, when: float | None = None) -> bytes:
    """received.c: `Received: from HOST (INFO@IP)` LF `  by LOCAL with PROTOCOL; DATE` LF."""
    parts = ["Received: from ", safe(remotehost or "unknown")]
    if helo is not None:
        parts += [" (HELO ", safe(helo), ")"]
    parts.append(" (")
    if remoteinfo:
        parts += [safe(remoteinfo), "@"]
    parts += [safe(remoteip or "unknown"), ")\n  by ", safe(local or "unknown"),
              f" with {protocol}; {date822(when)}\n"]
    return "".join(parts).encode("ascii")


class Committed(Protocol):
    id: int   # the queue's name for the message
    qp: int


class Draft(Protocol):
    qp: int
    injected: Committed | None   # set once synced

    def write(self, data: bytes) -> None: ...
    def stage(self, sender: str, recipients: list[str]) -> None: ...
    def sync(self) -> Committed: ...
    def close(self) -> None: ...


_QUEUE_TROUBLE = (SmarthostError, OSError, MemoryError)


def _qq_code(e: BaseException) -> int:
    """The qmail-queue exit code an exception stands for (qmail.c maps the rest to a bug)."""
    if isinstance(e, MemoryError):
        return 51
    return int(getattr(e, "exit_code", 0) or 81)


class QueueSink:
    """The queue end of a session: a lazily opened draft, its first error kept for the answer.

    qmail-qmqpd keeps reading after qmail-queue trouble and reports it once the
    request is in; so does this: a failed write is remembered, later data dropped.
    A commit does not wake the scheduler: the server does, once the client has
    its answer (`injected` says whether there is anything to wake it for).
    """

    def __init__(self, open_draft: Callable[[], Draft], header: bytes = b""):
        self._open = open_draft
        self.header = header
        self.draft: Draft | None = None
        self.error: int | None = None  # qmail-queue exit code of the first trouble
        self.reason = ""               # what went wrong, for the log (never for the client)
        self.finished = False
        self.injected: Committed | None = None   # what the draft's commit returned

    def _ensure(self) -> Draft | None:
        if self.draft is None and self.error is None:
            try:
                self.draft = self._open()
                if self.header:
                    self.draft.write(self.header)
            except _QUEUE_TROUBLE as e:  # reported in the answer, never raised
                self.error, self.reason = _qq_code(e), str(e)
        return self.draft if self.error is None else None

    def write(self, data: bytes) -> None:
        draft = self._ensure()
        if draft is None:
            return
        try:
            draft.write(data)
        except _QUEUE_TROUBLE as e:
            self.error, self.reason = _qq_code(e), str(e)

    def write_all(self, pieces: Iterable[bytes]) -> None:
        """write() each piece in turn (a batch the session handed over at once)."""
        for piece in pieces:
            self.write(piece)

    def finish(self, event: Request | Refused, when: float | None = None) -> str:
        """Commit (for a Request) or discard; the answer text."""
        text = self.stage(event)
        if text is not None:
            return text
        assert self.draft is not None
        try:
            self.draft.sync()
        except _QUEUE_TROUBLE as e:
            return self.settle(e, when)
        return self.settle(None, when)

    # finish() in two halves, for a server that commits several sessions' drafts
    # together: stage(), then the draft's sync (or a group's), then settle().

    def stage(self, event: Request | Refused) -> str | None:
        """Write the envelope of a Request; None when the draft is ready to sync, else
        the answer (a refusal, or queue trouble) with the draft discarded."""
        self.finished = True
        if isinstance(event, Refused):
            self.discard()
            return event.answer
        draft = self._ensure()
        if draft is None:
            self.discard()
            return report(self.error or 81)
        try:
            draft.stage(event.sender.decode("utf-8", "surrogateescape"),
                        [r.decode("utf-8", "surrogateescape") for r in event.recipients])
        except _QUEUE_TROUBLE as e:
            return self.settle(e)
        return None

    def settle(self, trouble: BaseException | None, when: float | None = None) -> str:
        """The answer once the staged draft's sync is over (`trouble` if it failed)."""
        draft = self.draft
        try:
            if trouble is not None:
                self.reason = str(trouble)
                return report(_qq_code(trouble))
            assert draft is not None and draft.injected is not None
            self.injected = draft.injected
            return ok_text(draft.qp, when)
        finally:
            self.discard()

    def discard(self) -> None:
        """Drop the draft unless committed (Draft.close removes an uncommitted entry)."""
        if self.draft is not None:
            draft, self.draft = self.draft, None
            try:
                draft.close()
            except OSError:
                pass
