"""Remote delivery end to end: a test DNS zone, receivers on loopback addresses, RemoteDelivery.

Every exchanger is a real server on 127.0.0.x (or ::1) that the test starts; the
DNS server on 127.0.0.1 is the only one asked. The receivers misbehave on
purpose, and no failure may ever be reported as a success.
"""

import os

import pytest

from smarthost.remote.tcpto import TcptoFiles
from tests.remote_peers import CLOSE, MESSAGE, STALL, Blackhole

pytest_plugins = ["tests.remote_site"]  # the `site` fixture
pytestmark = pytest.mark.timeout(60)


def letters(results):
    return "".join(letter for letter, _ in results)


def test_first_mx_down_second_takes_all_recipients_in_one_transaction(site):
    site.mx("a.test", (10, "mx1.a.test", "127.0.0.5"), (20, "mx2.a.test", "127.0.0.2"))
    peer = site.smtp("127.0.0.2")
    res = site.deliver(["x@a.test", "y@a.test", "Z@A.TEST"])
    assert res == [("K", "127.0.0.2 accepted message.\nRemote host said: 250 ok 1234 qp 5678\n")] * 3
    [mail] = peer.mails
    assert mail.rcpts == ["x@a.test", "y@a.test", "Z@A.TEST"] and mail.helo == "relay.test"
    assert mail.sender == "sender@here.test"
    assert mail.data == MESSAGE.replace(b"\n", b"\r\n")
    assert any("127.0.0.5" in line and "Connection refused" in line for line in site.log)
    assert peer.commands[1].startswith(b"MAIL FROM:<sender@here.test> BODY=8BITMIME")


def test_all_exchangers_down_defers_then_delivers_when_one_comes_back(site):
    site.mx("b.test", (10, "mx1.b.test", "127.0.0.5"), (10, "mx2.b.test", "127.0.0.6"))
    res = site.deliver(["x@b.test"])
    assert res == [("Z", "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n")]
    peer = site.smtp("127.0.0.6")
    assert letters(site.deliver(["x@b.test"])) == "K"
    assert len(peer.mails) == 1


def test_equal_preferences_are_tried_in_random_order(site):
    site.mx("r.test", (5, "one.r.test", "127.0.0.2"), (5, "two.r.test", "127.0.0.3"))
    one, two = site.smtp("127.0.0.2"), site.smtp("127.0.0.3")
    rd = site.delivery()
    for _ in range(24):
        assert letters(site.deliver(["x@r.test"], rd=rd)) == "K"
    assert one.mails and two.mails


def test_5xx_is_permanent_with_the_receivers_text(site):
    site.mx("c.test", (10, "mx.c.test", "127.0.0.2"))
    site.smtp("127.0.0.2", replies={"RCPT": b"550-5.1.1 no such user\r\n550 5.1.1 really not\r\n"})
    [(letter, text)] = site.deliver(["nobody@c.test"])
    assert letter == "D"
    assert text == ("127.0.0.2 does not like recipient.\n"
                    "Remote host said: 550-5.1.1 no such user\n550 5.1.1 really not\n"
                    "Giving up on 127.0.0.2.\n")


def test_4xx_is_temporary(site):
    site.mx("d.test", (10, "mx.d.test", "127.0.0.2"))
    site.smtp("127.0.0.2", replies={"MAIL": b"451 4.3.0 try later\r\n"})
    assert site.deliver(["x@d.test", "y@d.test"]) == [
        ("Z", "Connected to 127.0.0.2 but sender was rejected.\nRemote host said: 451 4.3.0 try later\n")] * 2


def test_some_recipients_refused_others_accepted(site):
    site.mx("e.test", (10, "mx.e.test", "127.0.0.2"))
    answers = {"bad@e.test": b"550 5.1.1 unknown\r\n", "later@e.test": b"452 4.2.2 mailbox full\r\n"}
    for extensions in [("PIPELINING",), ()]:
        peer = site.smtp("127.0.0.2", extensions=extensions,
                         replies={"RCPT": lambda a: answers.get(a, b"250 ok\r\n")})
        res = site.deliver(["a@e.test", "bad@e.test", "later@e.test", "d@e.test"])
        site.close(peer)
        assert letters(res) == "KDZK"
        assert res[1][1] == "127.0.0.2 does not like recipient.\nRemote host said: 550 5.1.1 unknown\n"
        assert res[2][1] == "127.0.0.2 does not like recipient.\nRemote host said: 452 4.2.2 mailbox full\n"
        assert peer.mails[0].rcpts == ["a@e.test", "d@e.test"]


def test_ehlo_refused_falls_back_to_helo_and_dot_stuffing(site):
    site.mx("h.test", (10, "mx.h.test", "127.0.0.2"))
    peer = site.smtp("127.0.0.2", replies={"EHLO": b"500 what?\r\n"})
    data = b"Subject: dots\n\n.leading dot\n..two\nbare\rcr\r\nalready crlf\n.\n"
    assert letters(site.deliver(["x@h.test"], data=data)) == "K"
    assert [c.split(b" ")[0] for c in peer.commands[:3]] == [b"EHLO", b"HELO", b"MAIL"]
    assert b"BODY=8BITMIME" not in peer.commands[2]
    assert peer.mails[0].data == b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nbare\r\ncr\r\nalready crlf\r\n.\r\n"


def test_mxps_exchanger_gets_qmtp(site):
    site.mx("q.test", (12801, "mx.q.test", "127.0.0.2"))
    qpeer = site.qmtp("127.0.0.2", answer=lambda r: b"Dno such user" if r.startswith("bad") else b"Kthanks, queued")
    speer = site.smtp("127.0.0.2")
    res = site.deliver(["a@q.test", "bad@q.test"], sender="s@here.test")
    assert res == [("K", "127.0.0.2 accepted message.\nRemote host said: thanks, queued\n"),
                   ("D", "127.0.0.2 does not like recipient.\nRemote host said: no such user\n")]
    [(message, sender, rcpts)] = qpeer.packages
    assert message == b"\n" + MESSAGE and sender == "s@here.test" and rcpts == ["a@q.test", "bad@q.test"]
    assert not speer.connections


def test_qmtp_down_falls_back_to_smtp_on_the_same_host(site):
    site.mx("q2.test", (12817, "mx.q2.test", "127.0.0.2"))
    speer = site.smtp("127.0.0.2")
    assert letters(site.deliver(["a@q2.test"])) == "K"
    assert len(speer.mails) == 1
    assert any("QMTP to 127.0.0.2" in line and "trying SMTP" in line for line in site.log)


def test_qmtp_connected_but_failed_is_not_retried_by_smtp(site):
    site.mx("q3.test", (12801, "mx.q3.test", "127.0.0.2"))
    site.qmtp("127.0.0.2", answer=lambda r: CLOSE)
    speer = site.smtp("127.0.0.2")
    [(letter, text)] = site.deliver(["a@q3.test"])
    assert letter == "Z" and "Connected to 127.0.0.2 but connection died." in text
    assert "Possible duplicate!" in text
    assert not speer.connections


def test_qmtproutes_force_qmtp_to_a_relay(site):
    site.control("qmtproutes", f"qr.test:127.0.0.3:{site.qmtp_port}\n")
    qpeer = site.qmtp("127.0.0.3")
    assert letters(site.deliver(["a@qr.test"])) == "K"
    assert len(qpeer.packages) == 1


def test_smtproutes_catchall_sends_everything_to_the_smart_relay(site):
    site.control("smtproutes", f"# a null client's smart host\n:[127.0.0.1]:{site.smtp_port}\nmx.test:\n")
    peer = site.smtp("127.0.0.1")  # this host's own address: no loop check for a relay
    assert letters(site.deliver(["x@nowhere.test", "y@nowhere.test"])) == "KK"
    assert peer.mails[0].rcpts == ["x@nowhere.test", "y@nowhere.test"]
    assert site.dns.queries == []
    # `mx.test:` is an exception: MX lookup as usual.
    site.mx("mx.test", (10, "in.mx.test", "127.0.0.4"))
    other = site.smtp("127.0.0.4")
    assert letters(site.deliver(["x@mx.test"])) == "K" and len(other.mails) == 1


def test_smtproutes_relay_by_name_and_suffix(site):
    site.dns.add("relay.example.test", "A", "127.0.0.3")
    site.control("smtproutes", "x.test:nothere.test\n.x.test:relay.example.test\n")
    peer = site.smtp("127.0.0.3")
    assert letters(site.deliver(["a@deep.sub.x.test"])) == "K" and len(peer.mails) == 1
    [(letter, text)] = site.deliver(["a@x.test"])
    assert (letter, text) == ("D", "Sorry, I couldn't find any host named nothere.test. (#5.1.2)\n")


def test_dns_answers_map_to_qmails_reports(site):
    assert site.deliver(["a@missing.test"]) == [("D", "Sorry, I couldn't find any host named missing.test. (#5.1.2)\n")]
    site.dns.servfail.add("broken.test")
    assert site.deliver(["a@broken.test"]) == [("Z", "Sorry, I couldn't find any host by that name. (#4.1.2)\n")]
    site.dns.add("nullmx.test", "MX", "0 .")
    assert letters(site.deliver(["a@nullmx.test"])) == "D"
    site.dns.add("nomx.test", "A", "127.0.0.2")        # no MX: the domain is its own exchanger
    peer = site.smtp("127.0.0.2")
    assert letters(site.deliver(["a@nomx.test"])) == "K" and len(peer.mails) == 1
    site.dns.add("noaddr.test", "TXT", '"nothing to connect to"')
    assert site.deliver(["a@noaddr.test"]) == [("D", "Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)\n")]


def test_an_mx_that_is_this_host_is_not_a_delivery(site):
    site.mx("loop.test", (10, "me.loop.test", "127.0.0.1"))
    [(letter, text)] = site.deliver(["a@loop.test"])
    assert letter == "D" and text.endswith("so I don't treat it as local. (#5.4.6)\n")
    # a backup MX behind us is not used either; a better one is
    site.mx("loop2.test", (10, "me.loop2.test", "127.0.0.1"), (20, "other.loop2.test", "127.0.0.2"))
    assert letters(site.deliver(["a@loop2.test"])) == "D"
    site.mx("loop3.test", (5, "best.loop3.test", "127.0.0.2"), (10, "me.loop3.test", "127.0.0.1"))
    site.smtp("127.0.0.2")
    assert letters(site.deliver(["a@loop3.test"])) == "K"
    # control/moreipme adds an address the interfaces do not show
    site.control("moreipme", "127.0.0.2\n")
    assert letters(site.deliver(["a@loop3.test"])) == "D"


def test_ipv6_exchanger(site):
    site.mx("six.test", (10, "mx.six.test", "::1"))
    site.control("notipme", "::1\n")  # ::1 is ours; pretend it is another host
    peer = site.smtp("::1")
    res = site.deliver(["a@six.test"])
    assert res == [("K", "::1 accepted message.\nRemote host said: 250 ok 1234 qp 5678\n")]
    # an IPv6 relay in smtproutes, bracketed, with its port
    site.control("smtproutes", f"relay6.test:[::1]:{site.smtp_port}\n")
    assert letters(site.deliver(["a@relay6.test"])) == "K"
    assert len(peer.mails) == 2


def test_stall_mid_dialogue_defers(site):
    site.control("timeoutremote", "1\n")
    site.mx("s.test", (10, "mx.s.test", "127.0.0.2"))
    peer = site.smtp("127.0.0.2", replies={"RCPT": STALL})
    [(letter, text)] = site.deliver(["a@s.test"])
    assert (letter, text) == ("Z", "Connected to 127.0.0.2 but connection died. "
                                   "No reply for 1 second after RCPT TO. (#4.4.2)\n")
    assert not peer.mails


@pytest.mark.parametrize("key, reply, detail", [
    ("GREETING", b"hello, I am not SMTP\r\n", "A garbled reply at the greeting."),
    ("EHLO", b"250-fine\r\nbut then garbage\r\n", "A garbled reply after EHLO."),
    ("GREETING", b"220 " + b"x" * 100_000 + b"\r\n", "A reply line longer than 65536 bytes at the greeting."),
    ("GREETING", b"220-" + b"y" * 60_000 + b"\r\n" + b"220-" + b"y" * 60_000 + b"\r\n" + b"220 " * 50_000 + b"\r\n",
     "A reply line longer than 65536 bytes at the greeting."),
    ("MAIL", CLOSE, "The connection closed after MAIL FROM."),
    ("DOT", b"\x00\x01\x02garbage\r\n", "A garbled reply after the end of the message. Possible duplicate!"),
])
def test_garbage_and_oversized_replies_defer(site, key, reply, detail):
    site.mx("g.test", (10, "mx.g.test", "127.0.0.2"))
    site.smtp("127.0.0.2", replies={key: reply})
    [(letter, text)] = site.deliver(["a@g.test"])
    assert letter == "Z"
    assert text == f"Connected to 127.0.0.2 but connection died. {detail} (#4.4.2)\n"


def test_multiline_replies_and_a_long_greeting(site):
    site.mx("m.test", (10, "mx.m.test", "127.0.0.2"))
    greeting = b"".join(b"220-line %d of a long banner\r\n" % i for i in range(200)) + b"220 done\r\n"
    ehlo = b"250-peer\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n250 PIPELINING\r\n"
    peer = site.smtp("127.0.0.2", replies={"GREETING": greeting, "EHLO": ehlo,
                                           "DOT": b"250-queued\r\n250 as 1234\r\n"})
    res = site.deliver(["a@m.test"])
    assert res == [("K", "127.0.0.2 accepted message.\nRemote host said: 250-queued\n250 as 1234\n")]
    assert len(peer.mails) == 1


def test_close_during_data_is_never_a_success(site):
    site.mx("cd.test", (10, "mx.cd.test", "127.0.0.2"))
    site.smtp("127.0.0.2", replies={"BODY": CLOSE})
    big = MESSAGE + b"x" * 100 + b"\n" + (b"y" * 998 + b"\n") * 8000
    for data in (MESSAGE, big):
        [(letter, text)] = site.deliver(["a@cd.test"], data=data)
        assert letter == "Z" and text.startswith("Connected to 127.0.0.2 but connection died. ")


def test_close_after_the_final_dot_warns_of_a_duplicate(site):
    site.mx("dup.test", (10, "mx.dup.test", "127.0.0.2"))
    site.smtp("127.0.0.2", replies={"DOT": CLOSE})
    [(letter, text)] = site.deliver(["a@dup.test"])
    assert letter == "Z"
    assert text == ("Connected to 127.0.0.2 but connection died. The connection closed after the end "
                    "of the message. Possible duplicate! (#4.4.2)\n")


def test_partial_final_line_is_refused_before_the_transaction(site):
    site.mx("p.test", (10, "mx.p.test", "127.0.0.2"))
    peer = site.smtp("127.0.0.2")
    assert site.deliver(["a@p.test"], data=b"Subject: x\n\nno newline") == [
        ("D", "SMTP cannot transfer messages with partial final lines. (#5.6.2)\n")]
    assert not any(c.startswith(b"MAIL") for c in peer.commands)


def test_tcpto_remembers_a_host_that_does_not_answer(site):
    site.control("timeoutconnect", "1\n")
    site.mx("t.test", (10, "slow.t.test", "127.0.0.7"), (20, "ok.t.test", "127.0.0.2"))
    hole = Blackhole("127.0.0.7", site.smtp_port)
    try:
        peer = site.smtp("127.0.0.2")
        tcpto = TcptoFiles(os.path.join(site.root.queue_dir, "lock"))
        assert letters(site.deliver(["a@t.test"])) == "K"
        [(ip, count, _)] = tcpto.entries()
        assert str(ip) == "127.0.0.7" and count == 1
        # a second timeout two minutes later parks it: the next delivery does not wait for it
        tcpto.note(ip, True, now=int(__import__("time").time()) + 150)
        site.log.clear()
        assert letters(site.deliver(["b@t.test"])) == "K"
        assert any("skipping 127.0.0.7" in line for line in site.log)
        assert not any("timed out after" in line for line in site.log)
        assert len(peer.mails) == 2
    finally:
        hole.close()
