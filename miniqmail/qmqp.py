"""QMQP, the client's half (cr.yp.to/proto/qmqp.html; qmail-qmqpc.c, qmail-qmqpc(8)).

Pure codec, no I/O. A request is one netstring holding the message, the
sender and each recipient as netstrings:

    netstring( netstring(message) netstring(sender) netstring(rcpt) ... )

The outer length counts the message, so it must be known before the first
byte goes out; `Request` gives the bytes that go before and after a message
of a known length, so the message itself can be streamed from a file.

The reply is one netstring whose first byte is `K` (accepted), `Z`
(temporary failure) or `D` (permanent failure), the rest being text.
Anything else -- not a netstring, an empty one, another first byte, more
than `REPLY_MAX` bytes, or the connection closing first -- is a
`ProtocolFailure`, which a client treats as temporary: qmqp.html says a
missing response means temporary failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from miniqmail import netstring

#: The port qmail-qmqpc dials (qmail CHANGES, 1998: moved to the official 628).
PORT = 628

#: No QMQP server sends a long reply; a bound keeps a hostile one from filling memory.
REPLY_MAX = 65536


class Letter(str, Enum):
    """The verdict byte of a QMQP reply."""

    K = "K"
    Z = "Z"
    D = "D"


@dataclass(frozen=True)
class Reply:
    """A well-formed reply: the verdict for the whole message and the server's text."""

    letter: Letter
    text: str

    def report(self) -> str:
        """The reply as qmail writes such texts: the letter, then the text."""
        return self.letter.value + self.text


@dataclass(frozen=True)
class ProtocolFailure:
    """No usable reply: a temporary failure of the connection, never of the message."""

    reason: str


def _address(addr: str) -> bytes:
    # Addresses come from the envelope, which may hold any bytes but NUL.
    return addr.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Request:
    """The bytes around a message of `message_length` bytes: `head`, the message, `tail`."""

    head: bytes
    tail: bytes
    message_length: int

    @property
    def length(self) -> int:
        """Every byte of the request on the wire."""
        return len(self.head) + self.message_length + len(self.tail)

    @classmethod
    def build(cls, message_length: int, sender: str, recipients: list[str] | tuple[str, ...]) -> Request:
        if message_length < 0:
            raise ValueError("negative message length")
        inner_head = netstring.header(message_length)
        after = [b",", netstring.encode(_address(sender))]
        after += [netstring.encode(_address(r)) for r in recipients]
        inner_tail = b"".join(after)
        inner = len(inner_head) + message_length + len(inner_tail)
        return cls(netstring.header(inner) + inner_head, inner_tail + b",", message_length)


def encode_request(message: bytes, sender: str, recipients: list[str] | tuple[str, ...]) -> bytes:
    """A whole request for a message already in memory."""
    req = Request.build(len(message), sender, recipients)
    return req.head + message + req.tail


def _text(data: bytes) -> str:
    # The text reaches a person's terminal; control bytes become '?'.
    text = data.decode("utf-8", "replace")
    return "".join(ch if ch >= " " and ch != "\x7f" else "?" for ch in text)


def verdict(data: bytes) -> Reply | ProtocolFailure:
    """The meaning of a reply's contents (the bytes inside the netstring)."""
    if not data:
        return ProtocolFailure("empty reply")
    try:
        letter = Letter(chr(data[0]))
    except ValueError:
        return ProtocolFailure("reply does not start with K, Z or D")
    return Reply(letter, _text(data[1:]))


class ReplyReader:
    """Incremental reader of one reply, h11-style: `feed` bytes until it returns a result.

    `feed` returns None while more bytes are needed; `eof` gives the result
    when the connection closes. Bytes after the reply's comma are ignored: the
    server has said its word and is about to close.
    """

    def __init__(self, limit: int = REPLY_MAX):
        self._decoder = netstring.Decoder(limit)
        self._parts: list[bytes] = []
        self.result: Reply | ProtocolFailure | None = None

    def feed(self, data: bytes) -> Reply | ProtocolFailure | None:
        if self.result is not None:
            return self.result
        try:
            self._decoder.feed(data)
        except netstring.TooLong:
            self.result = ProtocolFailure("reply too long")
            return self.result
        except netstring.NetstringError:
            self.result = ProtocolFailure("reply is not a netstring")
            return self.result
        self._parts += self._decoder.take()
        if self._decoder.done:
            self.result = verdict(b"".join(self._parts))
        return self.result

    def eof(self) -> Reply | ProtocolFailure:
        if self.result is None:
            self.result = ProtocolFailure("connection closed before the reply ended")
        return self.result


def parse_reply(data: bytes, limit: int = REPLY_MAX) -> Reply | ProtocolFailure:
    """The result of a whole reply as received up to the connection's end; never raises."""
    reader = ReplyReader(limit)
    result = reader.feed(data)
    return result if result is not None else reader.eof()
