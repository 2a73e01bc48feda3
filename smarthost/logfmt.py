"""Log-line helpers in qmail-send's style (qmail-log(5))."""

from __future__ import annotations


def safe(text: str | bytes) -> str:
    """Make text safe for one log line the way qmail-send does: LF -> '/', odd bytes -> '_'."""
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogateescape")
    out = bytearray()
    for b in text:
        if b == 10:
            out.append(47)  # '/'
        elif b < 33 or b > 126 or b == 37:  # controls, space, 8-bit and '%'
            out.append(95)  # '_'
        else:
            out.append(b)
    return out.decode("ascii")
