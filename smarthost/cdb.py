"""D. J. Bernstein's constant database, byte-compatible with cdb(3)/cdbmake(1).

Follows cdb.txt, cdb_hash.c, cdb_seek.c and cdbmake's cdb_make.c as shipped
with qmail 1.03 and ucspi-tcp 0.88, so users/cdb (qmail-newu) and the rules
cdbs (tcprules) written here are read by the C programs and the other way round.

Layout, every number a 32-bit little-endian word, the file < 4 GiB:

    header   256 x (table position, slot count)            2048 bytes
    records  key length, data length, key, data            from offset 2048
    tables   256 hash tables, written in order 0..255      after the records

A key hashes to h (djb's h = h*33 ^ c from 5381); table h mod 256 has twice as
many slots as records, each slot (hash, record position), position 0 = empty.
A lookup starts at slot (h >> 8) mod slots and probes linearly with wrap-around
until an empty slot. Records enter their tables in the order they were added,
so for duplicate keys the first one added is found first (qmail-newu and
tcprules rely on that).
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from array import array
from types import TracebackType
from typing import Iterable, Iterator

HEADER_SIZE = 2048
MAX_POSITION = 0xFFFFFFFF  # every position is one 32-bit word

_U32 = "I" if array("I").itemsize == 4 else "L"  # a 32-bit unsigned array item
_PAIR = struct.Struct("<II")
_HEADER = struct.Struct("<512I")


class CdbError(ValueError):
    """The file is not a well-formed cdb, or a write would break the format."""


def cdb_hash(key: bytes) -> int:
    """cdb_hash.c: h = 5381; h = ((h << 5) + h) ^ c, kept to 32 bits."""
    h = 5381
    for c in key:
        h = (((h << 5) + h) & 0xFFFFFFFF) ^ c
    return h


class Reader:
    """A read-only view of one cdb file through mmap."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER_SIZE:
                raise CdbError(f"{self.path}: too short for a cdb ({size} bytes)")
            if size > MAX_POSITION + 1:
                raise CdbError(f"{self.path}: too large for a cdb")
            self._map = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        self._size = size
        words = _HEADER.unpack_from(self._map, 0)
        self._tables = [(words[2 * i], words[2 * i + 1]) for i in range(256)]
        for i, (pos, slots) in enumerate(self._tables):
            # Checked once here so that no lookup can index past the end.
            if slots and (pos < HEADER_SIZE or pos + 8 * slots > size):
                self.close()
                raise CdbError(f"{self.path}: hash table {i} lies outside the file")
        # cdbdump's rule: table 0 is written right after the last record.
        self._end_of_records = self._tables[0][0]
        if not HEADER_SIZE <= self._end_of_records <= size:
            self.close()
            raise CdbError(f"{self.path}: bad end of records {self._end_of_records}")

    def _record(self, pos: int, limit: int) -> tuple[int, int]:
        """The (key length, data length) at `pos`, checked to fit before `limit`."""
        if pos < HEADER_SIZE or pos + 8 > limit:
            raise CdbError(f"{self.path}: record position {pos} out of range")
        klen, dlen = _PAIR.unpack_from(self._map, pos)
        if pos + 8 + klen + dlen > limit:
            raise CdbError(f"{self.path}: record at {pos} runs past the end")
        return klen, dlen

    def _find(self, key: bytes) -> Iterator[bytes]:
        """Every record for `key`, in the order cdb_findnext meets them."""
        h = cdb_hash(key)
        tpos, slots = self._tables[h & 0xFF]
        if not slots:
            return
        slot = (h >> 8) % slots
        klen = len(key)
        # At most `slots` probes, like cdb_findnext: a table with no empty slot cannot loop.
        for _ in range(slots):
            shash, rpos = _PAIR.unpack_from(self._map, tpos + 8 * slot)
            if rpos == 0:
                return
            if shash == h:
                rklen, rdlen = self._record(rpos, self._size)
                if rklen == klen and self._map[rpos + 8 : rpos + 8 + klen] == key:
                    start = rpos + 8 + klen
                    yield self._map[start : start + rdlen]
            slot += 1
            if slot == slots:
                slot = 0

    def get(self, key: bytes) -> bytes | None:
        """The data of the first record for `key`, or None."""
        for data in self._find(key):
            return data
        return None

    def get_all(self, key: bytes) -> list[bytes]:
        """The data of every record for `key`, first added first."""
        return list(self._find(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.get(key) is not None

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, data) in file order, like cdbdump."""
        pos = HEADER_SIZE
        end = self._end_of_records
        while pos < end:
            klen, dlen = self._record(pos, end)
            key = self._map[pos + 8 : pos + 8 + klen]
            yield key, self._map[pos + 8 + klen : pos + 8 + klen + dlen]
            pos += 8 + klen + dlen

    def close(self) -> None:
        m = getattr(self, "_map", None)
        if m is not None and not m.closed:
            m.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _fsync_dir(path: str) -> None:
    # The rename is only durable once the directory entry is on disk.
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Writer:
    """cdbmake: records stream to `path`.tmp; finish() adds the tables and renames over `path`."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.tmp_path = self.path + ".tmp"
        fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._file = os.fdopen(fd, "wb")
        self._file.write(b"\0" * HEADER_SIZE)  # the header is filled in by finish()
        self._pos = HEADER_SIZE
        # Only (hash, position) per record stays in memory, one pair of arrays per table.
        self._hashes = [array(_U32) for _ in range(256)]
        self._positions = [array(_U32) for _ in range(256)]
        self._done = False

    def add(self, key: bytes, data: bytes) -> None:
        if self._done:
            raise CdbError(f"{self.path}: add after finish or abort")
        end = self._pos + 8 + len(key) + len(data)
        if end > MAX_POSITION:
            raise CdbError(f"{self.path}: a cdb must stay under 4 GiB")
        h = cdb_hash(key)
        self._file.write(_PAIR.pack(len(key), len(data)))
        self._file.write(key)
        self._file.write(data)
        self._hashes[h & 0xFF].append(h)
        self._positions[h & 0xFF].append(self._pos)
        self._pos = end

    def _tables(self) -> bytes:
        """Write the 256 tables after the records; return the header that points at them."""
        header = []
        for hashes, positions in zip(self._hashes, self._positions):
            slots = 2 * len(hashes)
            if self._pos + 8 * slots > MAX_POSITION:
                raise CdbError(f"{self.path}: a cdb must stay under 4 GiB")
            table = array(_U32, bytes(8 * slots))  # slots * (hash, position), all empty
            for h, p in zip(hashes, positions):  # input order: the first added probes first
                where = (h >> 8) % slots
                while table[2 * where + 1]:
                    where += 1
                    if where == slots:
                        where = 0
                table[2 * where] = h
                table[2 * where + 1] = p
            header += [self._pos, slots]
            if sys.byteorder != "little":
                table.byteswap()
            self._file.write(table.tobytes())
            self._pos += 8 * slots
        return _HEADER.pack(*header)

    def finish(self) -> None:
        """Write the tables and header, fsync, and rename the tmp file over `path`."""
        if self._done:
            raise CdbError(f"{self.path}: finish after finish or abort")
        try:
            header = self._tables()
            self._file.seek(0)
            self._file.write(header)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.rename(self.tmp_path, self.path)
            self._done = True
        except BaseException:
            self.abort()
            raise
        _fsync_dir(self.path)

    def abort(self) -> None:
        """Drop the tmp file; `path` keeps whatever it had."""
        self._done = True
        try:
            self._file.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.finish()
        elif not self._done:
            self.abort()


def write(path: str | os.PathLike[str], items: Iterable[tuple[bytes, bytes]]) -> None:
    """Make the cdb at `path` from `items` in one atomic step."""
    with Writer(path) as w:
        for key, data in items:
            w.add(key, data)
