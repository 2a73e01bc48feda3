"""SMTP and QMTP client codecs and qmail-remote's report formats, without sockets.

Every decoder is fed three ways (whole, a byte at a time, with trailing bytes
that must stay) and with arbitrary bytes, which either decode or raise the
protocol error.
"""

import pytest
from hypothesis import given, settings, strategies as st

from smarthost.remote import report
from smarthost.remote.qmtp_client import QmtpError, Responses, outcome, package_head, package_tail
from smarthost.remote.report import Outcome, per_recipient, wire
from smarthost.remote.smtp_codec import DataEncoder, Reply, ReplyError, ReplyParser, smtp_path, unsafe_address


def replies(data: bytes, step: int | None, **limits) -> tuple[list[Reply], int]:
    p = ReplyParser(**limits)
    out = []
    pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        p.feed(piece)
        while (r := p.next()) is not None:
            out.append(r)
    return out, p.pending


@pytest.mark.parametrize("step", [None, 1, 5])
def test_replies_single_multiline_and_trailing_bytes(step):
    data = b"220 hi there\r\n250-peer\r\n250-PIPELINING\r\n250 8BITMIME\r\n354\r\n550 no\nPART"
    got, pending = replies(data, step)
    assert [r.code for r in got] == [220, 250, 354, 550]
    assert got[1].lines == (b"250-peer", b"250-PIPELINING", b"250 8BITMIME")
    assert got[1].keywords() == {"PIPELINING": "", "8BITMIME": ""}
    assert got[3].text() == "550 no\n"
    assert pending == 4  # "PART" waits for its line end


@pytest.mark.parametrize("bad", [b"hello\r\n", b"25\r\n", b"2500 x\r\n", b"650 x\r\n", b"150 x\r\n",
                                 b"250-ok\r\nnot a code\r\n", b"abc def\r\n", b"\r\n"])
def test_garbled_replies_are_refused(bad):
    for step in (None, 1):
        with pytest.raises(ReplyError):
            replies(bad, step)


def test_reply_budgets():
    with pytest.raises(ReplyError, match="line longer"):
        replies(b"220 " + b"x" * 200, 7, max_line=100)
    with pytest.raises(ReplyError, match="line longer"):
        replies(b"220 " + b"x" * 200 + b"\r\n", None, max_line=100)
    with pytest.raises(ReplyError, match="reply longer"):
        replies(b"250-xxxxxxxxxx\r\n" * 20, None, max_line=100, max_reply=200)
    ok, _ = replies(b"250-xxxxxxxxxx\r\n" * 5 + b"250 end\r\n", 3, max_line=100, max_reply=200)
    assert len(ok[0].lines) == 6


def test_report_text_is_bounded_and_nul_free():
    r = Reply(550, (b"550 a\0b\r", b"550 " + b"z" * 9000))
    text = r.text()
    assert text.startswith("550 a?b\n550 zzz") and len(text.encode()) <= 5000


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.sampled_from([None, 1, 3]))
def test_any_bytes_parse_or_raise(data, step):
    try:
        got, _ = replies(data, step, max_line=40, max_reply=60)
    except ReplyError:
        return
    for r in got:
        assert 200 <= r.code <= 599 and r.lines


def encode(data: bytes, step: int | None) -> bytes:
    enc = DataEncoder()
    pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    return b"".join(enc.feed(p) for p in pieces) + enc.end()


@pytest.mark.parametrize("step", [None, 1, 2, 7])
def test_data_encoding(step):
    assert encode(b"a\n.b\n..c\n\n.\nend\n", step) == b"a\r\n..b\r\n...c\r\n\r\n..\r\nend\r\n.\r\n"
    assert encode(b"crlf\r\nstays\r\n", step) == b"crlf\r\nstays\r\n.\r\n"
    # a bare CR is a line end on the wire, so "\r.\r\n" cannot end the message early
    assert encode(b"x\r.\r\ny\n", step) == b"x\r\n..\r\ny\r\n.\r\n"
    assert encode(b"", step) == b".\r\n"
    assert encode(b"8bit \xe9\xff\n", step) == b"8bit \xe9\xff\r\n.\r\n"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200).map(lambda b: b + b"\n"), st.integers(1, 9))
def test_encoding_does_not_depend_on_chunking_and_is_transparent(data, step):
    out = encode(data, None)
    assert encode(data, step) == out
    body = out[:-3]
    assert b"\r\n.\r\n" not in b"\r\n" + body and b"\n" not in body.replace(b"\r\n", b"")
    lines = body.split(b"\r\n")[:-1]
    undone = b"\n".join(line[1:] if line.startswith(b".") else line for line in lines) + b"\n"
    assert undone == data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def test_address_quoting_like_quote_c():
    assert smtp_path("") == b"<>"
    assert smtp_path("a.b+c@example.test") == b"<a.b+c@example.test>"
    assert smtp_path("a b@x.test") == b'<"a b"@x.test>'
    assert smtp_path('q"t\\@x.test') == b'<"q\\"t\\\\"@x.test>'
    assert smtp_path(".dot@x.test") == b'<".dot"@x.test>'
    assert smtp_path("a..b@x.test") == b'<"a..b"@x.test>'
    assert smtp_path("#@[]") == b"<#@[]>"
    assert smtp_path("postmaster") == b"<postmaster>"
    assert unsafe_address("a\r\nRCPT TO:<x>@y") and unsafe_address("a\0b") and not unsafe_address("a@b")


def test_qmtp_package_and_answers():
    assert package_head(5) == b"6:\n"
    assert package_tail("s@x", ["a@y", "b@y"]) == b",3:s@x,12:3:a@y,3:b@y,,"
    data = b"6:Kfine.,7:Dno way,3:Zso,TAIL"
    for step in (None, 1, 4):
        r = Responses(3)
        pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
        got = [a for p in pieces for a in r.feed(p)]
        assert got == [("K", "fine."), ("D", "no way"), ("Z", "so")]
    for bad in (b"2:Xy,", b"0:,", b"3:Kab;", b"x:"):
        with pytest.raises(QmtpError):
            Responses(1).feed(bad)
    with pytest.raises(QmtpError):
        Responses(1, limit=10).feed(b"11:")


def test_qmtp_outcomes():
    out = outcome("10.0.0.1", [("K", "ok"), ("D", "no")], 2)
    assert per_recipient(out, 2) == [("K", "10.0.0.1 accepted message.\nRemote host said: ok\n"),
                                     ("D", "10.0.0.1 does not like recipient.\nRemote host said: no\n")]
    # accepted answers stand when the connection dies before the others
    out = outcome("10.0.0.1", [("K", "ok")], 3, died="The connection closed.", critical=True)
    got = per_recipient(out, 3)
    assert [g[0] for g in got] == ["K", "Z", "Z"] and "Possible duplicate!" in got[1][1]
    out = outcome("10.0.0.1", [], 2, died="No reply for 5 seconds.")
    assert [g[0] for g in per_recipient(out, 2)] == ["Z", "Z"]


def test_per_recipient_follows_qmail_rspawn():
    giving_up = Outcome("D", "Giving up on 1.2.3.4.\n", [("h", "1.2.3.4 does not like recipient.\n")])
    assert per_recipient(giving_up, 1) == [("D", "1.2.3.4 does not like recipient.\nGiving up on 1.2.3.4.\n")]
    mixed = Outcome("K", "1.2.3.4 accepted message.\n", [("r", ""), ("h", "no.\n"), ("s", "later.\n")])
    assert per_recipient(mixed, 3) == [("K", "1.2.3.4 accepted message.\n"), ("D", "no.\n"), ("Z", "later.\n")]
    failed = Outcome("Z", "1.2.3.4 failed after I sent the message.\n", [("r", ""), ("s", "later.\n")])
    assert per_recipient(failed, 2) == [("Z", "1.2.3.4 failed after I sent the message.\n"),
                                        ("Z", "later.\n1.2.3.4 failed after I sent the message.\n")]
    early = report.message("Z", report.NOCONN)
    assert per_recipient(early, 2) == [("Z", report.NOCONN)] * 2
    assert wire(mixed) == b"r\0hno.\n\0slater.\n\0K1.2.3.4 accepted message.\n\0"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60), st.sampled_from([None, 1, 4]), st.integers(1, 3))
def test_any_bytes_give_qmtp_answers_or_raise(data, step, expected):
    r = Responses(expected, limit=20)
    pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    try:
        got = [a for p in pieces for a in r.feed(p)]
    except QmtpError:
        return
    assert len(got) <= expected and all(letter in "KZD" for letter, _ in got)
