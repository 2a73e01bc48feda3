"""What maildirwatch(1) shows for one message (qmail 1.03's maildirwatch.c).

For each message in new/: `FROM <Return-Path> TO <Delivered-To>`, then the
From: field in bold (when there is one), then up to 158 bytes made of the
Subject and the start of the body, then a blank line. Bytes outside
printable ASCII become `/` in the From field and the text, `?` in the two
addresses. When a field occurs twice the last one counts, as in qmail.

Only the header and the first bytes of the body are read, a bounded line
at a time; a header field is cut at FIELD_LIMIT bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

#: qmail's limit on the Subject-and-body text: two 79-column lines.
TEXT_LIMIT = 158
FIELD_LIMIT = 8192
LINE_LIMIT = 8192

BOLD = b"\033[1m"
PLAIN = b"\033[0m"
#: home the cursor and clear the screen (VT100), as maildirwatch does before each listing.
CLEAR = b"\033[;H\033[;J"


def _table(replacement: str) -> bytes:
    return bytes(b if 32 <= b < 127 else ord(replacement) for b in range(256))


_QUESTION = _table("?")
_SLASH = _table("/")


@dataclass(frozen=True)
class Summary:
    """The four things maildirwatch shows, as raw bytes from the message."""

    sender: bytes = b"?"
    recipient: bytes = b"?"
    from_field: bytes = b""
    text: bytes = b""

    def render(self, ansi: bool) -> bytes:
        """The lines maildirwatch prints; `ansi` adds the bold From field."""
        out = [b"FROM ", self.sender.translate(_QUESTION), b" TO <",
               self.recipient.translate(_QUESTION), b">\n"]
        if self.from_field:
            line = self.from_field.translate(_SLASH)
            out += [BOLD, line, PLAIN, b"\n"] if ansi else [line, b"\n"]
        out += [self.text.translate(_SLASH), b"\n\n"]
        return b"".join(out)


def _name_and_value(field: bytes) -> tuple[bytes, bytes]:
    name, _, rest = field.partition(b":")
    return name.strip().lower(), rest.lstrip(b" \t\r\n")


def _line(message: BinaryIO) -> bytes:
    """One whole line, cut at LINE_LIMIT bytes; the rest of a longer line is read and dropped."""
    line = message.readline(LINE_LIMIT)
    if line and not line.endswith(b"\n"):
        while (rest := message.readline(LINE_LIMIT)) and not rest.endswith(b"\n"):
            pass
        line += b"\n" if rest else b""
    return line


def summarize(message: BinaryIO) -> Summary:
    """Read the header and the start of the body of `message`; return its Summary."""
    fields: list[bytes] = []
    current = b""
    body_start = b""
    while True:
        line = _line(message)
        if line[:1] in (b" ", b"\t") and current:
            current = (current + line)[:FIELD_LIMIT]
            continue
        if current:
            fields.append(current)
            current = b""
        if not line or line in (b"\n", b"\r\n"):
            break
        if b":" not in line:
            body_start = line  # not a header field: the body starts here
            break
        current = line[:FIELD_LIMIT]
    sender, recipient, from_field, text = b"?", b"?", b"", b""
    for field in fields:
        name, value = _name_and_value(field)
        if name == b"subject":
            text = (text + value)[:TEXT_LIMIT]
        elif name == b"delivered-to":
            recipient = value.rstrip(b"\n")
        elif name == b"return-path":
            sender = value.rstrip(b"\n")
        elif name == b"from":
            from_field = field.rstrip(b"\n")
    text = (text + body_start)[:TEXT_LIMIT]
    while len(text) < TEXT_LIMIT:
        chunk = message.read(TEXT_LIMIT - len(text))
        if not chunk:
            break
        text += chunk
    return Summary(sender, recipient, from_field, text)
