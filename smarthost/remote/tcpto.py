"""Hosts that did not answer, remembered for about an hour (qmail's tcpto.c, qmail-tcpto(8)).

`queue/lock/tcpto` is qmail's file, byte for byte: 64 records of 16 bytes,

    0..3 IPv4 address   4 count of recent timeouts (at most 10)   5..7 unused
    8..11 time of the last timeout, little-endian   12..15 unused

IPv6 addresses, which qmail never saw, go to `queue/lock/tcpto6` in the same
shape widened to 32-byte records (address 0..15, count 16, time 20..23), so
the IPv4 file stays readable by qmail's own qmail-tcpto. Each file is read
and written under an exclusive flock.

The rules: only a connect timeout counts, and one less than 120 s after the
last one is ignored; a successful connection or any other failure sets the
count back to 0; an address with 2 or more timeouts is skipped for
(60 + j) * 64 seconds after the last (j = 0..31, from the pid in qmail:
64 to 97 minutes, "an hour"). A new address takes a free record, else the
one with the smallest time + count * 1024.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import struct
import time
from dataclasses import dataclass
from typing import Callable

from smarthost.remote.routing import IP

RECORDS = 64
MAX_COUNT = 10
IGNORE_WITHIN = 120


def window(jitter: int) -> int:
    return (60 + (jitter & 31)) << 6


@dataclass(frozen=True)
class Layout:
    size: int       # bytes per record
    addr: int       # address length, at offset 0
    count: int      # offset of the count byte
    when: int       # offset of the 32-bit little-endian time


V4 = Layout(16, 4, 4, 8)
V6 = Layout(32, 16, 16, 20)


class Table:
    """The records of one file; pure, the caller supplies the time."""

    def __init__(self, data: bytes, layout: Layout):
        full = RECORDS * layout.size
        self.layout = layout
        self.data = bytearray(data[:full].ljust(full, b"\0"))

    def _at(self, i: int) -> tuple[bytes, int, int]:
        lay, base = self.layout, i * self.layout.size
        rec = self.data[base:base + lay.size]
        return bytes(rec[:lay.addr]), rec[lay.count], struct.unpack_from("<I", rec, lay.when)[0]

    def _set(self, i: int, addr: bytes, count: int, when: int) -> None:
        lay, base = self.layout, i * self.layout.size
        self.data[base:base + lay.addr] = addr
        self.data[base + lay.count] = count
        struct.pack_into("<I", self.data, base + lay.when, when & 0xFFFFFFFF)

    def find(self, addr: bytes) -> int | None:
        size = self.layout.size
        at = self.data.find(addr)
        while at >= 0:
            if at % size == 0:  # an address at the start of a record, not bytes inside one
                return at // size
            at = self.data.find(addr, at + 1)
        return None

    def parked(self, addr: bytes, now: int, jitter: int) -> bool:
        i = self.find(addr)
        if i is None:
            return False
        _, count, when = self._at(i)
        return count >= 2 and (now & 0xFFFFFFFF) - when < window(jitter)

    def note(self, addr: bytes, timed_out: bool, now: int) -> bool:
        """Record one connection attempt's end; True if the table changed."""
        i = self.find(addr)
        if i is not None:
            _, count, when = self._at(i)
            if not timed_out:
                if count == 0:
                    return False
                self._set(i, addr, 0, when)
                return True
            if count and (now & 0xFFFFFFFF) < IGNORE_WITHIN + when:
                return False
            self._set(i, addr, min(count + 1, MAX_COUNT), now)
            return True
        if not timed_out:
            return False
        records = [self._at(j) for j in range(RECORDS)]
        free = [j for j, (_, count, _) in enumerate(records) if count == 0]
        slot = free[0] if free else min(range(RECORDS), key=lambda j: (records[j][2] + (records[j][1] << 10), j))
        self._set(slot, addr, 1, now)
        return True

    def entries(self) -> list[tuple[bytes, int, int]]:
        """(address, count, time) of every record with a count."""
        return [rec for rec in (self._at(i) for i in range(RECORDS)) if rec[1] >= 1]


class TcptoFiles:
    """queue/lock/tcpto and tcpto6. Trouble with them never stops a delivery (as in qmail)."""

    def __init__(self, lockdir: str):
        self.lockdir = lockdir

    def path(self, layout: Layout) -> str:
        return os.path.join(self.lockdir, "tcpto" if layout is V4 else "tcpto6")

    @staticmethod
    def _key(ip: IP) -> tuple[Layout, bytes]:
        return (V4 if ip.version == 4 else V6), ip.packed

    def _update(self, layout: Layout, change: Callable[[Table], bool] | None) -> Table:
        fd = os.open(self.path(layout), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            table = Table(os.pread(fd, RECORDS * layout.size, 0), layout)
            if change is not None and change(table):
                os.pwrite(fd, bytes(table.data), 0)
            return table
        finally:
            os.close(fd)  # closing drops the lock

    def check(self, ip: IP, jitter: int, now: int | None = None) -> tuple[bool, bool]:
        """(parked, seen): skip this address?, and does the table know it at all?"""
        layout, addr = self._key(ip)
        try:
            table = self._update(layout, None)
        except OSError:
            return False, False
        return table.parked(addr, int(time.time()) if now is None else now, jitter), table.find(addr) is not None

    def note(self, ip: IP, timed_out: bool, seen: bool = True, now: int | None = None) -> None:
        if not timed_out and not seen:
            return  # qmail does not bother: nothing to set back
        layout, addr = self._key(ip)
        stamp = int(time.time()) if now is None else now
        try:
            self._update(layout, lambda t: t.note(addr, timed_out, stamp))
        except OSError:
            pass

    def entries(self) -> list[tuple[IP, int, int]]:
        """Every address with recent timeouts: (address, count, time). OSError if unreadable."""
        out: list[tuple[IP, int, int]] = []
        for layout in (V4, V6):
            if not os.path.exists(self.path(layout)):
                continue
            for addr, count, when in self._update(layout, None).entries():
                out.append((ipaddress.ip_address(addr), count, when))
        return out

    def clear(self) -> None:
        """What qmail-tcpok does: every record zero. OSError if that fails."""
        for layout in (V4, V6):
            path = self.path(layout)
            if layout is V6 and not os.path.exists(path):
                continue
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.pwrite(fd, bytes(RECORDS * layout.size), 0)
            finally:
                os.close(fd)
