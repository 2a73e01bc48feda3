"""The control-directory reader, after qmail's control.c and qmail-control(5).

A missing file means qmail's default; an unreadable one is a temporary error
(qmail exits 55 "unable to read configuration"). Single-value files give their
first line with trailing blanks stripped; numbers are the leading digits;
lists skip blank lines and lines starting with '#'.
"""

from __future__ import annotations

import os


class ControlError(OSError):
    """A control file exists but cannot be read: always a temporary failure."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"unable to read {path}: {reason}")
        self.path = path
        self.reason = reason


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ControlError(path, "is a directory") from None
    except OSError as e:
        raise ControlError(path, e.strerror or str(e)) from None


class Control:
    """Reads files from one `control/` directory; every read goes to the disk."""

    def __init__(self, directory: str):
        self.directory = directory

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def exists(self, name: str) -> bool:
        return os.path.exists(self.path(name))

    def line(self, name: str, default: str | None = None) -> str | None:
        """First line of `name`, trailing blanks stripped; `default` if missing."""
        data = _read(self.path(name))
        if data is None:
            return default
        first = data.split(b"\n", 1)[0]
        return first.rstrip(b" \t\r").decode("utf-8", "surrogateescape")

    def number(self, name: str, default: int) -> int:
        """The leading digits of the first line; `default` if missing or none."""
        text = self.line(name)
        if text is None:
            return default
        digits = ""
        for ch in text.lstrip(" \t"):
            if not ch.isdigit() or not ch.isascii():
                break
            digits += ch
        return int(digits) if digits else default

    def lines(self, name: str, default: list[str] | None = None) -> list[str] | None:
        """All non-blank, non-comment lines with trailing blanks stripped."""
        data = _read(self.path(name))
        if data is None:
            return default
        out = []
        for raw in data.split(b"\n"):
            raw = raw.rstrip(b" \t\r")
            if not raw or raw.startswith(b"#"):
                continue
            out.append(raw.decode("utf-8", "surrogateescape"))
        return out

    def me_default(self, name: str, literal: str) -> str:
        """qmail's usual fallback: the file, else control/me, else a literal name."""
        value = self.line(name)
        if value is not None:
            return value
        me = self.line("me")
        return me if me is not None else literal
