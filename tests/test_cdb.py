"""smarthost.cdb against cdb.txt: exact bytes, first-wins duplicates, hostile files."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smarthost import cdb
from smarthost.cdb import CdbError, Reader, Writer, cdb_hash

# cdb_hash("one"), step by step: h = 5381
#   'o' (111): 5381 * 33 = 177573,      ^ 111 = 177610
#   'n' (110): 177610 * 33 = 5861130,   ^ 110 = 5861220
#   'e' (101): 5861220 * 33 = 193420260, ^ 101 = 193420161 = 0x0B875B81
ONE_HASH = 193420161


def one_record_cdb() -> bytes:
    """The cdb of the single record one -> Hello, assembled from cdb.txt by hand."""
    table = ONE_HASH & 0xFF  # 0x81 = 129
    slot = (ONE_HASH >> 8) % 2  # 2 slots for 1 record; 0x0B875B is odd -> slot 1
    assert (table, slot) == (129, 1)
    record = struct.pack("<II", 3, 5) + b"one" + b"Hello"  # at 2048, ends at 2064
    header = b""
    for i in range(256):
        if i < 129:
            header += struct.pack("<II", 2064, 0)  # empty tables before 129 sit at 2064
        elif i == 129:
            header += struct.pack("<II", 2064, 2)
        else:
            header += struct.pack("<II", 2080, 0)  # after table 129's 16 bytes
    tables = struct.pack("<II", 0, 0) + struct.pack("<II", ONE_HASH, 2048)
    return header + record + tables


def test_hash_vectors() -> None:
    assert cdb_hash(b"") == 5381
    assert cdb_hash(b"one") == ONE_HASH
    assert cdb_hash(b"\xff" * 64) < 2**32


def test_one_record_is_byte_exact(tmp_path) -> None:
    path = tmp_path / "one.cdb"
    cdb.write(path, [(b"one", b"Hello")])
    data = path.read_bytes()
    assert len(data) == 2080
    assert struct.unpack_from("<II", data, 0) == (2064, 0)
    assert struct.unpack_from("<II", data, 8 * 129) == (2064, 2)
    assert struct.unpack_from("<II", data, 8 * 255) == (2080, 0)
    assert data == one_record_cdb()
    with Reader(path) as r:
        assert r.get(b"one") == b"Hello"
        assert r.get(b"two") is None


def test_reads_a_hand_made_file(tmp_path) -> None:
    path = tmp_path / "hand.cdb"
    path.write_bytes(one_record_cdb())
    with Reader(path) as r:
        assert r.get(b"one") == b"Hello"
        assert list(r.items()) == [(b"one", b"Hello")]


def test_empty_database(tmp_path) -> None:
    path = tmp_path / "empty.cdb"
    cdb.write(path, [])
    data = path.read_bytes()
    assert data == struct.pack("<II", 2048, 0) * 256
    with Reader(path) as r:
        assert r.get(b"") is None
        assert list(r.items()) == []


def test_duplicates_empty_key_and_data(tmp_path) -> None:
    path = tmp_path / "d.cdb"
    items = [(b"k", b"first"), (b"", b""), (b"k", b"second"), (b"x", b""), (b"k", b"third")]
    cdb.write(path, items)
    with Reader(path) as r:
        assert r.get(b"k") == b"first"
        assert r.get_all(b"k") == [b"first", b"second", b"third"]
        assert r.get(b"") == b""
        assert b"" in r and b"x" in r and b"y" not in r
        assert list(r.items()) == items


def test_writer_replaces_atomically_and_aborts(tmp_path) -> None:
    path = tmp_path / "a.cdb"
    cdb.write(path, [(b"old", b"1")])
    with pytest.raises(RuntimeError):
        with Writer(path) as w:
            w.add(b"new", b"2")
            assert os.path.exists(str(path) + ".tmp")
            raise RuntimeError("stop")
    assert not os.path.exists(str(path) + ".tmp")
    with Reader(path) as r:
        assert r.get(b"old") == b"1" and r.get(b"new") is None
    w = Writer(path)
    w.add(b"x", b"y")
    w.abort()
    assert not os.path.exists(str(path) + ".tmp")
    with pytest.raises(CdbError):
        w.add(b"z", b"z")
    cdb.write(path, [(b"new", b"2")])
    assert sorted(os.listdir(tmp_path)) == ["a.cdb"]
    with Reader(path) as r:
        assert r.get(b"new") == b"2" and r.get(b"old") is None


def test_many_records_in_one_table(tmp_path) -> None:
    # Keys chosen to share table 0 force long probe chains with wrap-around.
    keys = [b"%d" % i for i in range(20000) if cdb_hash(b"%d" % i) & 0xFF == 0][:60]
    path = tmp_path / "t.cdb"
    cdb.write(path, [(k, k[::-1]) for k in keys])
    with Reader(path) as r:
        assert all(r.get(k) == k[::-1] for k in keys)


@pytest.mark.parametrize("size", [0, 1, 2047])
def test_short_files_are_refused(tmp_path, size: int) -> None:
    path = tmp_path / "short.cdb"
    path.write_bytes(b"\0" * size)
    with pytest.raises(CdbError):
        Reader(path)


def test_table_outside_the_file(tmp_path) -> None:
    data = bytearray(one_record_cdb())
    struct.pack_into("<II", data, 8 * 129, 2064, 1000)
    path = tmp_path / "bad.cdb"
    path.write_bytes(bytes(data))
    with pytest.raises(CdbError):
        Reader(path)


def test_record_outside_the_file(tmp_path) -> None:
    data = bytearray(one_record_cdb())
    struct.pack_into("<I", data, 2064 + 12, 99999)  # slot 1's record position
    path = tmp_path / "bad.cdb"
    path.write_bytes(bytes(data))
    with Reader(path) as r, pytest.raises(CdbError):
        r.get(b"one")
    struct.pack_into("<I", data, 2048 + 4, 10**6)  # the record's data length
    path.write_bytes(bytes(data))
    with Reader(path) as r, pytest.raises(CdbError):
        list(r.items())


def test_full_table_does_not_loop(tmp_path) -> None:
    # Every slot taken and no key matching: the probe must stop after one round.
    data = bytearray(one_record_cdb())
    struct.pack_into("<II", data, 2064, ONE_HASH, 2048)
    struct.pack_into("<II", data, 2072, ONE_HASH, 2048)
    path = tmp_path / "full.cdb"
    path.write_bytes(bytes(data))
    with Reader(path) as r:
        assert r.get_all(b"one") == [b"Hello", b"Hello"]
        assert r.get(b"two") is None


pairs = st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=40)), max_size=60)


@settings(deadline=None, max_examples=200)
@given(pairs)
def test_round_trip_first_wins(tmp_path_factory, items: list[tuple[bytes, bytes]]) -> None:
    path = tmp_path_factory.mktemp("rt") / "p.cdb"
    cdb.write(path, items)
    with Reader(path) as r:
        assert list(r.items()) == items
        for key in {k for k, _ in items}:
            assert r.get_all(key) == [d for k, d in items if k == key]
            assert r.get(key) == next(d for k, d in items if k == key)
        assert r.get(b"\xff" * 13) is None  # longer than any key


def _probe(path, keys: list[bytes]) -> None:
    """Open, look up and dump: anything but CdbError is a bug."""
    try:
        with Reader(path) as r:
            for key in keys:
                r.get(key)
                r.get_all(key)
                _ = key in r
            list(r.items())
    except CdbError:
        pass


keys_st = st.lists(st.binary(max_size=6), min_size=1, max_size=6)


@st.composite
def plausible_files(draw, keys: list[bytes]) -> bytes:
    """Random bytes behind a header that opens, whose tables for `keys` point into the file."""
    body = draw(st.binary(min_size=0, max_size=200))
    size = 2048 + len(body)
    where = st.one_of(st.integers(2048, size), st.integers(0, 2**32 - 1))
    words = [size, 0] * 256
    words[0] = draw(st.integers(2048, size))  # end of records
    for key in keys:
        t = cdb_hash(key) & 0xFF
        pos = draw(where)
        words[2 * t : 2 * t + 2] = [pos, draw(st.integers(0, max(0, (size - pos) // 8)))]
    return struct.pack("<512I", *words) + body


@settings(deadline=None, max_examples=200)
@given(st.data(), keys_st)
def test_random_bytes_read_or_cdberror(tmp_path_factory, data, keys: list[bytes]) -> None:
    blob = data.draw(st.one_of(st.binary(max_size=2200), plausible_files(keys)))
    path = tmp_path_factory.mktemp("rb") / "r.cdb"
    path.write_bytes(blob)
    _probe(path, keys)


@settings(deadline=None, max_examples=200)
@given(pairs, st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=12))
def test_damaged_cdb_reads_or_cdberror(tmp_path_factory, items, damage) -> None:
    path = tmp_path_factory.mktemp("dm") / "d.cdb"
    cdb.write(path, items)
    data = bytearray(path.read_bytes())
    for where, byte in damage:
        data[where % len(data)] = byte
    path.write_bytes(bytes(data))
    _probe(path, [k for k, _ in items[:8]] + [b"nope"])


@pytest.mark.skipif(not shutil.which("cdbmake"), reason="cdbmake (freecdb) not installed")
def test_same_bytes_as_cdbmake(tmp_path) -> None:
    items = [(b"%d" % i, b"v%d" % (i * 7)) for i in range(500)] + [(b"1", b"dup"), (b"", b"empty")]
    text = b"".join(b"+%d,%d:%s->%s\n" % (len(k), len(d), k, d) for k, d in items) + b"\n"
    subprocess.run(["cdbmake", str(tmp_path / "c.cdb"), str(tmp_path / "c.tmp")], input=text, check=True)
    cdb.write(tmp_path / "p.cdb", items)
    assert (tmp_path / "p.cdb").read_bytes() == (tmp_path / "c.cdb").read_bytes()
