"""Netstring codec: whole, one byte at a time, trailing bytes unread, and any bytes at all."""

import io

import pytest
from hypothesis import given, settings, strategies as st

from miniqmail import netstring
from miniqmail.netstring import Decoder, NetstringError, TooLong


def decode_all(data: bytes, limit: int, step: int | None) -> tuple[bytes, int]:
    d = Decoder(limit)
    used = 0
    out = []
    while not d.done:
        if used >= len(data):
            raise NetstringError("end of input")
        piece = data[used:used + step] if step else data[used:]
        used += d.feed(piece)
        out += d.take()
    return b"".join(out), used


@pytest.mark.parametrize("step", [None, 1, 3])
def test_round_trip_and_trailing_bytes(step):
    raw = netstring.encode(b"hello, world") + b"NEXT"
    data, used = decode_all(raw, 100, step)
    assert data == b"hello, world" and raw[used:] == b"NEXT"


def test_empty_and_nested():
    assert netstring.encode(b"") == b"0:,"
    inner = netstring.encode(b"a") + netstring.encode(b"") + netstring.encode(b"xyz")
    assert list(netstring.split(inner)) == [b"a", b"", b"xyz"]
    assert netstring.read(io.BytesIO(netstring.encode(inner) + b"rest"), 100) == inner


@pytest.mark.parametrize("raw", [b":,", b"01:a,", b"00:,", b"1a:a,", b"-1:,", b" 1:a,", b"3:abc;", b"3:abcd,", b"3:ab"])
def test_strict_grammar(raw):
    with pytest.raises(NetstringError):
        decode_all(raw, 100, None)
    with pytest.raises(NetstringError):
        netstring.read(io.BytesIO(raw), 100)


def test_length_over_limit_refused_from_the_digits():
    d = Decoder(1000)
    with pytest.raises(TooLong):
        d.feed(b"1001")          # refused before the colon, nothing allocated
    with pytest.raises(TooLong):
        Decoder(10**12).feed(b"9999999999:")  # more than 9 digits


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=60), st.sampled_from([None, 1, 2, 7]))
def test_any_bytes_decode_or_raise(data, step):
    try:
        out, used = decode_all(data, 50, step)
    except NetstringError:
        return
    assert netstring.encode(out) == data[:used]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=20), max_size=6))
def test_split_inverts_concatenation(items):
    assert list(netstring.split(b"".join(netstring.encode(i) for i in items))) == items
