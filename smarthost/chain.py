"""A read-only stream of some bytes followed by a file: prepends a header without copying the message."""

from __future__ import annotations

import io
from typing import BinaryIO


class Chain(io.RawIOBase):
    def __init__(self, head: bytes, body: BinaryIO):
        self._head = memoryview(head)
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._body.read(len(b))
        b[: len(data)] = data
        return len(data)
