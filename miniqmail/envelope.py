"""The qmail-queue envelope (qmail-queue(8)): `F`sender NUL, `T`recipient NUL ..., then NUL.

Pure codec. The reader works on any binary stream, reads only the envelope
(one byte past it is never consumed) and bounds every address, so a hostile
or broken envelope cannot make it buffer without limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from miniqmail.exitcodes import QQ

#: qmail-queue refuses addresses longer than this (its man page says 1000).
ADDRESS_MAX = 1002


class EnvelopeError(ValueError):
    """A broken envelope; `code` is the qmail-queue exit code to use."""

    def __init__(self, reason: str, code: int = QQ.ENVELOPE):
        super().__init__(reason)
        self.code = int(code)


@dataclass(frozen=True)
class Envelope:
    sender: str
    recipients: tuple[str, ...]


def _addr(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def encode(sender: str, recipients: list[str] | tuple[str, ...]) -> bytes:
    """The envelope bytes for `sender` and `recipients`."""
    parts = [b"F", sender.encode("utf-8", "surrogateescape"), b"\0"]
    for r in recipients:
        parts += [b"T", r.encode("utf-8", "surrogateescape"), b"\0"]
    parts.append(b"\0")
    return b"".join(parts)


def read(stream: BinaryIO, address_max: int = ADDRESS_MAX) -> Envelope:
    """Read one envelope from `stream`.

    EOF before the final NUL, a first record not starting with `F`, or a later
    record not starting with `T` raise EnvelopeError(code 91); an address over
    `address_max` bytes raises EnvelopeError(code 11).
    """
    buf = bytearray()
    records: list[bytes] = []
    while True:
        chunk = stream.read(1)
        if not chunk:
            raise EnvelopeError("envelope ended before its final NUL")
        b = chunk[0]
        if b == 0:
            if not buf:
                if not records:
                    raise EnvelopeError("envelope has no sender record")
                break
            records.append(bytes(buf))
            buf.clear()
            continue
        buf.append(b)
        if len(buf) > address_max + 1:
            raise EnvelopeError("address too long", QQ.ADDRESS_TOO_LONG)
    first, rest = records[0], records[1:]
    if first[:1] != b"F":
        raise EnvelopeError("envelope does not start with F")
    for r in rest:
        if r[:1] != b"T":
            raise EnvelopeError("envelope record does not start with T")
    return Envelope(_addr(first[1:]), tuple(_addr(r[1:]) for r in rest))
