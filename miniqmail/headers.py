"""Reading a message's header the way qmail-inject does (headerbody.c, hfield.c; qmail-header(5)).

The header ends at the first empty line, or at the first line that is not a
header field (no colon, or a name with a blank, control or 8-bit byte) --
that line is then the body's first, with an empty line put before it. A
line starting `From ` becomes `MBOX-Line: From ...`. Continuation lines
(starting with a blank) join the field before them. A last line without a
newline gets one. Everything is bytes and passes through unchanged.

qmail holds the header in memory without a bound. Here one field may hold at
most `FIELD_MAX` bytes and the whole header `HEADER_MAX`; more is a
`HeaderError`, raised before anything is handed on. The body is not read.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO

#: Bytes in one header field, continuation lines included.
FIELD_MAX = 64 * 1024
#: Bytes in the whole header.
HEADER_MAX = 1024 * 1024

#: hfield.c's names. The canonical spelling is the key; matching ignores ASCII case.
KNOWN = frozenset((
    b"sender", b"from", b"reply-to", b"to", b"cc", b"bcc", b"date", b"message-id", b"subject",
    b"resent-sender", b"resent-from", b"resent-reply-to", b"resent-to", b"resent-cc", b"resent-bcc",
    b"resent-date", b"resent-message-id", b"return-receipt-to", b"errors-to", b"apparently-to",
    b"received", b"return-path", b"delivered-to", b"content-length", b"content-type",
    b"content-transfer-encoding", b"notice-requested-upon-delivery-to", b"mail-followup-to",
))


class HeaderError(ValueError):
    """A header over the limits: the message is refused whole."""


def known(field: bytes) -> bytes | None:
    """The lower-case name of a field qmail knows (`to`, `resent-cc`...), else None."""
    colon = field.find(b":")
    if colon < 0:
        return None
    name = field[:colon].rstrip(b" \t").lower()
    return name if name in KNOWN else None


def valid(line: bytes) -> bool:
    """Whether `line` starts a header field: a name of printable non-blank ASCII, blanks, a colon."""
    colon = line.find(b":")
    if colon < 0:
        return False
    name = line[:colon].rstrip(b" \t")
    return bool(name) and all(33 <= b <= 126 for b in name)


@dataclass(frozen=True)
class Header:
    """The fields in order (each ending in a newline) and what comes right after them.

    `after` is None when the input ended inside the header (no empty line is
    written then), else the empty line, followed by the line that ended the
    header when that was not an empty line.
    """

    fields: tuple[bytes, ...]
    after: bytes | None


def _line(stream: BinaryIO, crlf: bool) -> bytes:
    line = stream.readline(FIELD_MAX + 1)
    if crlf and line.endswith(b"\r\n"):
        line = line[:-2] + b"\n"
    return line


def read(stream: BinaryIO, crlf: bool = False) -> Header:
    """Read the header from `stream`, leaving it at the first byte of the body.

    With `crlf`, a CR before a line's LF is dropped (Postfix's sendmail does
    this; qmail-inject keeps it). Read errors (OSError) are the caller's.
    """
    fields: list[bytes] = []
    field = b""
    total = 0
    while True:
        line = _line(stream, crlf)
        if line and not line.endswith(b"\n") and len(line) <= FIELD_MAX:
            line += b"\n"  # the input ended inside this line
        if field and line[:1] in (b" ", b"\t"):
            field += line
        else:
            if field:
                fields.append(field)
                field = b""
            if not line:
                return Header(tuple(fields), None)
            if line == b"\n":
                return Header(tuple(fields), b"\n")
            if line.startswith(b"From "):
                field = b"MBOX-Line: " + line
            elif valid(line):
                field = line
            else:  # the body's first line; a long one is handed on unread past the limit
                return Header(tuple(fields), b"\n" + line)
        total += len(line)
        if len(field) > FIELD_MAX:
            raise HeaderError(f"a header field is longer than {FIELD_MAX} bytes")
        if total > HEADER_MAX:
            raise HeaderError(f"the header is longer than {HEADER_MAX} bytes")


class Message(io.RawIOBase):
    """`head`, then the rest of `body` as a stream: what qmail-inject hands on.

    Like headerbody.c, a body whose last line has no newline gets one. With
    `crlf`, CR LF in the body becomes LF. Never holds more than one chunk.
    """

    def __init__(self, head: bytes, body: BinaryIO | None, crlf: bool = False, fix_eol: bool = True):
        super().__init__()
        self._pending = memoryview(head)
        self._body = body
        self._crlf = crlf
        self._fix_eol = fix_eol
        self._last = head[-1:] or b"\n"  # the last byte handed out
        self._held_cr = False

    def readable(self) -> bool:
        return True

    def _more(self, size: int) -> bytes:
        if self._body is None:
            return b""
        data = self._body.read(size)
        if not data:
            self._body = None
            tail = b""
            if self._held_cr:  # "x\r" at the very end: the LF added below would make it CR LF
                tail = b"\n" if self._fix_eol else b"\r"
            elif self._fix_eol and self._last != b"\n":
                tail = b"\n"
            self._held_cr = False
            return tail
        if self._crlf:
            if self._held_cr:
                data = b"\r" + data
            self._held_cr = data.endswith(b"\r")
            if self._held_cr:
                data = data[:-1]
            data = data.replace(b"\r\n", b"\n")
        if data:
            self._last = data[-1:]
        return data

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        want = len(buffer)
        while not self._pending:
            data = self._more(max(want, 8192))
            if not data:
                if self._body is None:
                    return 0
                continue  # only a held CR so far
            self._pending = memoryview(data)
        n = min(want, len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n
