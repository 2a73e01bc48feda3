"""SMTP client codecs: replies (RFC 5321 §4.2), message transparency (§4.5.2, §2.3.8)
and address quoting (qmail's quote.c), as qmail-remote(8) uses them.

Pure: bytes in, values out, no I/O. `ReplyParser` is fed whatever the socket
gave and hands out whole replies; it refuses anything that is not a reply and
anything over its budgets, so a hostile server costs a bounded amount of memory.
"""

from __future__ import annotations

from dataclasses import dataclass

#: one reply line, line end included. RFC 5321 allows 512; real servers send more.
MAX_LINE = 65536
#: one whole (multi-line) reply.
MAX_REPLY = 256 * 1024
#: reply text kept for a report (qmail-remote's HUGESMTPTEXT).
REPORT_TEXT = 5000


class ReplyError(ValueError):
    """The server's bytes are not an SMTP reply, or one over a budget."""


@dataclass(frozen=True)
class Reply:
    """One reply: the code of its first line (qmail's rule) and its lines, line ends removed."""

    code: int
    lines: tuple[bytes, ...]

    def text(self) -> str:
        """The reply as a report quotes it: lines joined by LF, at most REPORT_TEXT bytes."""
        raw = b"".join(line + b"\n" for line in self.lines)[:REPORT_TEXT]
        # NUL would end the report early in qmail-remote's output; it prints '?'.
        raw = raw.replace(b"\r", b"").replace(b"\0", b"?")
        return raw.decode("utf-8", "surrogateescape")

    def said(self) -> str:
        return "Remote host said: " + self.text()

    def keywords(self) -> dict[str, str]:
        """EHLO extensions: keyword (upper case) -> its parameters."""
        out: dict[str, str] = {}
        for line in self.lines[1:]:
            words = line[4:].decode("ascii", "replace").split(None, 1)
            if words:
                out[words[0].upper()] = words[1] if len(words) > 1 else ""
        return out


def _code(line: bytes) -> int:
    if len(line) < 3 or not line[:3].isdigit() or line[0] not in b"2345":
        raise ReplyError("a garbled reply")
    if len(line) > 3 and line[3] not in b" -":
        raise ReplyError("a garbled reply")
    return int(line[:3])


class ReplyParser:
    """Feed bytes, take whole replies; bytes after a reply stay for the next one."""

    def __init__(self, max_line: int = MAX_LINE, max_reply: int = MAX_REPLY):
        self.max_line = max_line
        self.max_reply = max_reply
        self._buf = bytearray()
        self._scan = 0          # where the search for the next LF goes on
        self._lines: list[bytes] = []
        self._size = 0

    @property
    def pending(self) -> int:
        """Bytes received and not yet part of a reply handed out."""
        return len(self._buf) + self._size

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> Reply | None:
        """The next whole reply, or None if more bytes are needed."""
        while True:
            nl = self._buf.find(b"\n", self._scan)
            if nl < 0:
                self._scan = len(self._buf)
                if len(self._buf) > self.max_line:
                    raise ReplyError(f"a reply line longer than {self.max_line} bytes")
                return None
            if nl + 1 > self.max_line:
                raise ReplyError(f"a reply line longer than {self.max_line} bytes")
            line = bytes(self._buf[:nl]).rstrip(b"\r")
            del self._buf[:nl + 1]
            self._scan = 0
            self._size += nl + 1
            if self._size > self.max_reply:
                raise ReplyError(f"a reply longer than {self.max_reply} bytes")
            _code(line)  # every line must look like one; the first line's code counts
            self._lines.append(line)
            if len(line) > 3 and line[3] == 0x2D:  # '-': more lines follow
                continue
            lines, self._lines, self._size = tuple(self._lines), [], 0
            return Reply(int(lines[0][:3]), lines)


class DataEncoder:
    """The message as DATA carries it: CRLF line ends, leading dots doubled.

    The queued message has LF line ends. A CRLF already there is passed through
    (as notqmail does); a bare CR is sent as a line end too, because RFC 5321
    §2.3.8 forbids bare CR and LF on the wire and receivers that take a bare CR
    for a line end could be tricked into ending the message early (SMTP
    smuggling). Feed the message in chunks of any size; `end()` gives the final
    dot line.
    """

    def __init__(self) -> None:
        self.bol = True          # the next byte starts a line
        self._cr = False         # a CR ended the last chunk; its meaning depends on the next byte

    def feed(self, data: bytes) -> bytes:
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        out = []
        pieces = data.split(b"\n")
        last = len(pieces) - 1
        for i, piece in enumerate(pieces):
            if piece:
                if self.bol and piece[0] == 0x2E:
                    out.append(b".")
                out.append(piece)
                self.bol = False
            if i < last:
                out.append(b"\r\n")
                self.bol = True
        return b"".join(out)

    def end(self) -> bytes:
        """The end of the message: a held-back CR, then `.` CRLF."""
        tail = b"\r\n" if self._cr else b""
        self._cr = False
        if not tail and not self.bol:
            tail = b"\r\n"   # callers refuse partial final lines before they get here
        self.bol = True
        return tail + b".\r\n"


#: characters a local part may hold unquoted (quote.c's table; '.' has its own rules)
_ATOM = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                  b"!#$%&'*+-/=?^_`{|}~.")


def _needs_quotes(local: bytes) -> bool:
    if not local or local[:1] == b"." or local[-1:] == b"." or b".." in local:
        return True
    return any(b not in _ATOM for b in local)


def smtp_path(addr: str) -> bytes:
    """`<addr>` with the local part quoted where RFC 5321 needs it (qmail's addrmangle)."""
    raw = addr.encode("utf-8", "surrogateescape")
    local, at, domain = raw.rpartition(b"@")
    if not at:
        return b"<" + raw + b">"
    if _needs_quotes(local):
        local = b'"' + local.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"<" + local + b"@" + domain + b">"


def unsafe_address(addr: str) -> bool:
    """An address that could end an SMTP command line early: never put it on the wire."""
    return any(c in addr for c in "\r\n\0")
