"""Netstrings (cr.yp.to/proto/netstrings.txt): `LEN:` DATA `,` — strict and bounded.

Pure codec, no I/O. `parse_length` and `Decoder` refuse everything outside the
grammar: an empty length, a non-digit, a leading zero on a non-empty string,
a length over the caller's limit (refused as soon as the digits say so, before
anything is allocated), and any byte but `,` after the data. Servers that must
tolerate qmail's leniency do that explicitly, never here.
"""

from __future__ import annotations

from typing import BinaryIO, Iterator

#: DJB's sample reader takes at most 9 digits.
MAX_DIGITS = 9


class NetstringError(ValueError):
    """Input that is not a netstring, or one over the limit."""


class TooLong(NetstringError):
    """A declared length over the limit."""


def encode(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def header(length: int) -> bytes:
    """The `LEN:` that starts a netstring of `length` bytes (for writers that stream the data)."""
    return b"%d:" % length


class LengthParser:
    """Feeds on the bytes before `:`, one at a time; enforces the grammar and the limit."""

    __slots__ = ("limit", "value", "digits")

    def __init__(self, limit: int):
        self.limit = limit
        self.value = 0
        self.digits = 0

    def feed(self, b: int) -> int | None:
        """Take one byte; the length once `:` arrives, else None."""
        if b == 0x3A:  # ':'
            if self.digits == 0:
                raise NetstringError("netstring length is empty")
            return self.value
        if not 0x30 <= b <= 0x39:
            raise NetstringError("netstring length has a non-digit")
        if self.digits == 1 and self.value == 0:
            raise NetstringError("netstring length has a leading zero")
        self.digits += 1
        self.value = self.value * 10 + (b - 0x30)
        if self.value > self.limit or self.digits > MAX_DIGITS:
            raise TooLong(f"netstring longer than {self.limit} bytes")
        return None


def read_length(stream: BinaryIO, limit: int) -> int:
    """Read `LEN:` from a stream; EOF before the colon is a NetstringError."""
    p = LengthParser(limit)
    while True:
        c = stream.read(1)
        if not c:
            raise NetstringError("end of input inside a netstring length")
        n = p.feed(c[0])
        if n is not None:
            return n


def read_comma(stream: BinaryIO) -> None:
    c = stream.read(1)
    if c != b",":
        raise NetstringError("netstring does not end with a comma" if c else "end of input before the comma")


def read(stream: BinaryIO, limit: int) -> bytes:
    """Read one whole netstring of at most `limit` bytes from a stream."""
    n = read_length(stream, limit)
    data = _read_exact(stream, n)
    read_comma(stream)
    return data


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    parts = []
    while n:
        chunk = stream.read(min(n, 65536))
        if not chunk:
            raise NetstringError("end of input inside a netstring")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def split(data: bytes, limit: int | None = None) -> Iterator[bytes]:
    """The netstrings that make up `data` exactly (for the inside of a nested netstring)."""
    limit = len(data) if limit is None else limit
    pos = 0
    while pos < len(data):
        p = LengthParser(limit)
        while True:
            if pos >= len(data):
                raise NetstringError("end of input inside a netstring length")
            n = p.feed(data[pos])
            pos += 1
            if n is not None:
                break
        end = pos + n
        if end >= len(data):  # the comma must be at data[end]
            raise NetstringError("end of input inside a netstring")
        if data[end] != 0x2C:
            raise NetstringError("netstring does not end with a comma")
        yield data[pos:end]
        pos = end + 1


class Decoder:
    """Incremental decoder of one netstring, h11-style: feed bytes, get events.

    `feed(data)` returns how many bytes it used; afterwards `length` is known
    once the header is complete, `chunks` collects data pieces handed out by
    `take()`, and `done` says the comma arrived. Bytes after the comma are never
    consumed, so a caller can read what follows.
    """

    def __init__(self, limit: int):
        self._len = LengthParser(limit)
        self.length: int | None = None
        self.remaining = 0
        self.done = False
        self._pending: list[bytes] = []

    def feed(self, data: bytes) -> int:
        used = 0
        view = memoryview(data)
        while used < len(view) and not self.done:
            if self.length is None:
                n = self._len.feed(view[used])
                used += 1
                if n is not None:
                    self.length = self.remaining = n
            elif self.remaining:
                k = min(self.remaining, len(view) - used)
                self._pending.append(bytes(view[used:used + k]))
                used += k
                self.remaining -= k
            else:
                if view[used] != 0x2C:
                    raise NetstringError("netstring does not end with a comma")
                used += 1
                self.done = True
        return used

    def take(self) -> list[bytes]:
        """The data bytes decoded since the last call."""
        out, self._pending = self._pending, []
        return out
