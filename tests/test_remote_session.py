"""The SMTP client dialogue without sockets: SmtpSession driven by canned replies."""

import pytest

from smarthost.remote.smtp_codec import ReplyParser
from smarthost.remote.smtp_session import (BODY, READ, Died, Resume, Send, SmtpSession, StartTls, TlsFailed,
                                           TlsInfo, Transaction)
from smarthost.remote.tlspolicy import TlsMode

GREET = b"220 mx ESMTP\r\n"
EHLO_PIPE = b"250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
OK = b"250 ok\r\n"


def reply(raw: bytes):
    p = ReplyParser()
    p.feed(raw)
    return p.next()


def play(script, **kw):
    """Run a session: each READ takes the next script item (bytes, or an exception to throw).

    `session=[]` gets the SmtpSession appended; `resume=` starts it on a kept connection."""
    into, resume = kw.pop("session", None), kw.pop("resume", None)
    t = Transaction(helohost="me.test", sender=kw.pop("sender", "s@me.test"),
                    recipients=tuple(kw.pop("rcpts", ["a@x.test"])), partner="10.0.0.1", domain="x.test", **kw)
    session = SmtpSession(t, resume)
    if into is not None:
        into.append(session)
    gen = session.run()
    items = iter(script)
    sent, value, exc = [], None, None
    while True:
        try:
            op = gen.throw(exc) if exc else gen.send(value)
        except StopIteration as stop:
            return stop.value, sent
        value = exc = None
        if isinstance(op, Send):
            sent.append(op.data)
        elif op is BODY:
            sent.append("BODY")
        elif op is READ or isinstance(op, StartTls):
            item = next(items)
            if isinstance(op, StartTls):
                sent.append(f"TLS verify={op.verify}")
            if isinstance(item, Exception):
                exc = item
            elif isinstance(op, StartTls):
                value = item
            else:
                value = reply(item)


def test_plain_dialogue_one_command_at_a_time():
    out, sent = play([GREET, b"250 mx\r\n", OK, OK, OK, b"354 go\r\n", b"250 queued\r\n"],
                     rcpts=["a@x.test", "b@x.test"])
    assert sent == [b"EHLO me.test\r\n", b"MAIL FROM:<s@me.test>\r\n", b"RCPT TO:<a@x.test>\r\n",
                    b"RCPT TO:<b@x.test>\r\n", b"DATA\r\n", "BODY"]
    assert (out.letter, out.text, out.rcpts) == ("K", "10.0.0.1 accepted message.\nRemote host said: 250 queued\n",
                                                 [("r", ""), ("r", "")])


def test_pipelining_sends_the_envelope_in_one_go():
    out, sent = play([GREET, EHLO_PIPE, OK, OK, b"550 no\r\n", b"354 go\r\n", OK], rcpts=["a@x.test", "b@x.test"])
    assert sent[1] == (b"MAIL FROM:<s@me.test> BODY=8BITMIME\r\nRCPT TO:<a@x.test>\r\n"
                       b"RCPT TO:<b@x.test>\r\nDATA\r\n")
    assert out.letter == "K" and [r[0] for r in out.rcpts] == ["r", "h"]


def test_pipelining_in_batches():
    rcpts = [f"r{i}@x.test" for i in range(5)]
    out, sent = play([GREET, EHLO_PIPE, OK] + [OK] * 5 + [b"354 go\r\n", OK], rcpts=rcpts, batch=2)
    assert [s.count(b"RCPT") for s in sent[1:4]] == [2, 2, 1]
    assert sent[1].startswith(b"MAIL") and sent[3].endswith(b"DATA\r\n") and b"DATA" not in sent[2]
    assert out.letter == "K" and len(out.rcpts) == 5


def test_pipelining_sender_refused_and_nobody_accepted():
    out, sent = play([GREET, EHLO_PIPE, b"553 bad sender\r\n", b"503 no\r\n", b"503 no\r\n"])
    assert (out.letter, out.text) == ("D", "Connected to 10.0.0.1 but sender was rejected.\n"
                                           "Remote host said: 553 bad sender\n")
    assert out.rcpts == []
    # a server that answers DATA with 354 although no recipient is left gets an empty message
    out, sent = play([GREET, EHLO_PIPE, OK, b"550 no\r\n", b"354 go\r\n", b"554 no valid recipients\r\n"])
    assert sent[-1] == b".\r\n" and out.letter == "D" and out.text == "Giving up on 10.0.0.1.\n"


def test_helo_fallback_and_name_rejected():
    out, sent = play([GREET, b"502 no\r\n", b"250 hi\r\n", OK, OK, b"354 go\r\n", OK])
    assert sent[:2] == [b"EHLO me.test\r\n", b"HELO me.test\r\n"] and out.letter == "K"
    out, _ = play([GREET, b"502 no\r\n", b"501 who?\r\n"])
    assert (out.letter, out.text) == ("Z", "Connected to 10.0.0.1 but my name was rejected.\n"
                                           "Remote host said: 501 who?\n")
    out, _ = play([b"554 go away\r\n"])
    assert (out.letter, out.text) == ("Z", "Connected to 10.0.0.1 but greeting failed.\nRemote host said: 554 go away\n")


@pytest.mark.parametrize("code, letter", [(b"554", "D"), (b"451", "Z"), (b"250", "Z")])
def test_data_refused(code, letter):
    out, sent = play([GREET, b"250 mx\r\n", OK, OK, code + b" nope\r\n"])
    assert "BODY" not in sent
    assert (out.letter, out.text) == (letter, f"10.0.0.1 failed on DATA command.\nRemote host said: {code.decode()} nope\n")


def test_died_reports_where_and_possible_duplicate():
    out, _ = play([GREET, b"250 mx\r\n", OK, Died("The connection closed")])
    assert out.text == "Connected to 10.0.0.1 but connection died. The connection closed after RCPT TO. (#4.4.2)\n"
    out, _ = play([GREET, b"250 mx\r\n", OK, OK, b"354 go\r\n", Died("No reply for 5 seconds")])
    assert out.letter == "Z" and "after the end of the message. Possible duplicate! (#4.4.2)" in out.text
    assert out.rcpts == [("r", "")]


def test_starttls_then_ehlo_again():
    tls = TlsInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", False)
    ext = b"250-mx\r\n250 STARTTLS\r\n"
    out, sent = play([GREET, ext, b"220 go\r\n", tls, b"250 mx\r\n", OK, OK, b"354 go\r\n", OK])
    assert sent[:4] == [b"EHLO me.test\r\n", b"STARTTLS\r\n", "TLS verify=False", b"EHLO me.test\r\n"]
    assert out.letter == "K" and "TLSv1.3" in out.notes[0]


def test_tls_policy_outcomes():
    ext = b"250-mx\r\n250 STARTTLS\r\n"
    out, _ = play([GREET, b"250 mx\r\n"], tls=TlsMode.ENCRYPT)
    assert out.letter == "Z" and out.next_host and "does not offer STARTTLS" in out.text
    out, sent = play([GREET, ext, b"220 go\r\n", TlsFailed("certificate verify failed")], tls=TlsMode.VERIFY)
    assert "TLS verify=True" in sent and out.next_host and not out.plain_retry
    out, _ = play([GREET, ext, b"220 go\r\n", TlsFailed("wrong version number")])
    assert out.plain_retry and not out.next_host and out.letter == "Z"
    out, sent = play([GREET, ext, OK, OK, b"354 go\r\n", OK], tls=TlsMode.NONE)
    assert b"STARTTLS\r\n" not in sent and out.letter == "K"
    out, sent = play([GREET, ext, OK, OK, b"354 go\r\n", OK], starttls=False)
    assert b"STARTTLS\r\n" not in sent and out.letter == "K"


def test_partial_line_and_unsafe_addresses_never_reach_the_wire():
    out, sent = play([GREET, b"250 mx\r\n"], partial_line=True)
    assert out.letter == "D" and "partial final lines" in out.text and len(sent) == 1
    out, sent = play([GREET, b"250 mx\r\n"], sender="a\r\nRCPT TO:<x@y>")
    assert out.letter == "D" and len(sent) == 1
    out, sent = play([GREET, EHLO_PIPE, OK, OK, b"354 go\r\n", OK], rcpts=["bad\n@x.test", "a@x.test", "b\0@x.test"])
    assert sent[1] == b"MAIL FROM:<s@me.test> BODY=8BITMIME\r\nRCPT TO:<a@x.test>\r\nDATA\r\n"
    assert [r[0] for r in out.rcpts] == ["h", "r", "h"]


KEPT = Resume({"PIPELINING": "", "8BITMIME": ""}, None)


def test_a_kept_connection_starts_at_mail_from_and_may_carry_the_next():
    got = []
    out, sent = play([OK, OK, b"354 go\r\n", b"250 queued\r\n"], resume=KEPT, session=got)
    assert sent == [b"MAIL FROM:<s@me.test> BODY=8BITMIME\r\nRCPT TO:<a@x.test>\r\nDATA\r\n", "BODY"]
    assert out.letter == "K" and not out.stale
    assert got[0].reusable


@pytest.mark.parametrize("first", [b"421 closing\r\n", Died("The connection closed")], ids=["421", "died"])
def test_a_kept_connection_that_fails_before_mail_is_answered_is_stale(first):
    out, _ = play([first], resume=KEPT)
    assert out.letter == "Z" and out.stale


def test_a_failure_after_mail_is_answered_is_a_result_not_staleness():
    got = []
    out, _ = play([OK, OK, b"354 go\r\n", Died("The connection closed")], resume=KEPT, session=got)
    assert out.letter == "Z" and not out.stale
    assert not got[0].reusable


def test_a_421_after_the_message_ends_the_connection():
    got = []
    out, _ = play([GREET, EHLO_PIPE, OK, OK, b"354 go\r\n", b"421 shutting down\r\n"], session=got)
    assert out.letter == "Z" and not got[0].reusable
    got = []
    out, _ = play([GREET, EHLO_PIPE, OK, OK, b"354 go\r\n", b"554 no\r\n"], session=got)
    assert out.letter == "D" and got[0].reusable
