"""The qmail-queue envelope codec: whole, byte by byte, trailing bytes left unread, any bytes."""

import io

import pytest
from hypothesis import given, settings, strategies as st

from miniqmail import envelope
from miniqmail.exitcodes import QQ


class OneByte(io.RawIOBase):
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def readable(self):
        return True

    def readinto(self, b):
        if self.pos >= len(self.data):
            return 0
        b[0] = self.data[self.pos]
        self.pos += 1
        return 1


def test_round_trip_whole_and_byte_by_byte():
    raw = envelope.encode("a@b", ["c@d", "e@f"])
    assert raw == b"Fa@b\0Tc@d\0Te@f\0\0"
    for stream in (io.BytesIO(raw), OneByte(raw)):
        env = envelope.read(stream)
        assert env.sender == "a@b" and env.recipients == ("c@d", "e@f")


def test_trailing_bytes_stay_unread():
    stream = io.BytesIO(envelope.encode("", []) + b"REST")
    env = envelope.read(stream)
    assert env.sender == "" and env.recipients == ()
    assert stream.read() == b"REST"


@pytest.mark.parametrize("raw", [b"", b"Fa@b\0", b"Fa@b\0Tc@d\0", b"Xa@b\0\0", b"Fa\0Xb\0\0", b"\0"])
def test_broken_envelopes_are_91(raw):
    with pytest.raises(envelope.EnvelopeError) as e:
        envelope.read(io.BytesIO(raw))
    assert e.value.code == QQ.ENVELOPE


def test_long_address_is_11_without_reading_it_all():
    stream = io.BytesIO(b"F" + b"x" * 100000 + b"\0\0")
    with pytest.raises(envelope.EnvelopeError) as e:
        envelope.read(stream)
    assert e.value.code == QQ.ADDRESS_TOO_LONG
    assert stream.tell() < 2000


def test_address_of_exactly_the_limit_is_taken():
    addr = "x" * envelope.ADDRESS_MAX
    assert envelope.read(io.BytesIO(envelope.encode(addr, [addr]))).recipients == (addr,)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_envelope_error(data):
    try:
        env = envelope.read(io.BytesIO(data))
    except envelope.EnvelopeError as e:
        assert e.code in (QQ.ENVELOPE, QQ.ADDRESS_TOO_LONG)
    else:
        assert envelope.encode(env.sender, env.recipients) == data[: len(envelope.encode(env.sender, env.recipients))]
