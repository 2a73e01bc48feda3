"""Log-line helpers in qmail-send's style (qmail-log(5))."""

from __future__ import annotations

import sys
import time
from typing import TextIO


#: qmail-send's mapping, a byte at a time: LF -> '/', controls, space, 8-bit and '%' -> '_'.
_SAFE_TABLE = bytes(47 if b == 10 else 95 if b < 33 or b > 126 or b == 37 else b for b in range(256))


def safe(text: str | bytes) -> str:
    """Make text safe for one log line the way qmail-send does: LF -> '/', odd bytes -> '_'."""
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogateescape")
    return text.translate(_SAFE_TABLE).decode("ascii")


class Log:
    """One line per event, optionally stamped with the unix time; buffered here and
    written once per turn of the event loop (never per line, whatever
    PYTHONUNBUFFERED says). Outside a running loop the caller flushes."""

    def __init__(self, out: TextIO, timestamps: bool = False):
        self.out = out
        self.timestamps = timestamps
        self._lines: list[str] = []

    def __call__(self, line: str) -> None:
        if self.timestamps:
            line = f"{time.time():.6f} {line}"
        self._lines.append(line)
        if len(self._lines) == 1:
            # Not imported here: the delivery spawner uses no asyncio (see spawnclient).
            aio = sys.modules.get("asyncio")
            if aio is not None:
                try:
                    aio.get_running_loop().call_soon(self.flush)
                except RuntimeError:
                    pass
        elif len(self._lines) >= 1000:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):
            pass
