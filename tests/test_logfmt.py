"""Log-line helpers: qmail-send's byte mapping, and the buffered Log."""

import io

from hypothesis import given, strategies as st

from smarthost.logfmt import Log, safe


def expected(b: int) -> str:
    if b == 10:
        return "/"
    if b < 33 or b > 126 or b == ord("%"):
        return "_"
    return chr(b)


@given(st.binary(max_size=300))
def test_safe_maps_every_byte_as_qmail_send_does(data):
    out = safe(data)
    assert out == "".join(expected(b) for b in data)
    assert len(out) == len(data) and "\n" not in out


@given(st.text(max_size=100))
def test_safe_takes_text_as_its_utf8_bytes(text):
    assert safe(text) == safe(text.encode("utf-8", "surrogateescape"))


def test_safe_examples():
    assert safe("a b%c\nd\x00é") == "a_b_c/d___"
    assert safe(b"user@example.com") == "user@example.com"


def test_log_buffers_until_flushed_outside_a_loop():
    out = io.StringIO()
    log = Log(out)
    log("one")
    log("two")
    assert out.getvalue() == ""
    log.flush()
    assert out.getvalue() == "one\ntwo\n"
