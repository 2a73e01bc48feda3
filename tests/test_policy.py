"""Pure policy: local/remote routing, the retry schedule, bounce addressing and composition."""

import math

from miniqmail.control import Control
from smarthost import schedule
from smarthost.bounce import BounceConfig, compose_head, decide
from smarthost.rewrite import LOCAL, REMOTE, Routing


def routing(tmp_path, **files):
    d = tmp_path / "control"
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return Routing.from_control(Control(str(d)))


def test_locals_and_envnoathost(tmp_path):
    r = routing(tmp_path, me="mx.example\n", locals="mx.example\nExample.COM\n")
    assert r.route("joe@EXAMPLE.com") == (LOCAL, "joe@EXAMPLE.com")
    assert r.route("joe") == (LOCAL, "joe@mx.example")
    assert r.route("joe@elsewhere.org") == (REMOTE, "joe@elsewhere.org")


def test_locals_defaults_to_me(tmp_path):
    r = routing(tmp_path, me="mx.example\n")
    assert r.route("a@mx.example")[0] == LOCAL


def test_virtualdomains_forms_and_order(tmp_path):
    r = routing(tmp_path, me="mx\n", virtualdomains=(
        "# comment\n"
        "special@virt.example:spec\n"
        "virt.example:v\n"
        ".sub.example:subs\n"
        ".deep.sub.example:deep\n"
        "except.sub.example:\n"))
    assert r.route("special@virt.example") == (LOCAL, "spec-special@virt.example")
    assert r.route("joe@VIRT.example") == (LOCAL, "v-joe@VIRT.example")
    assert r.route("joe@a.sub.example") == (LOCAL, "subs-joe@a.sub.example")
    assert r.route("joe@a.deep.sub.example") == (LOCAL, "deep-joe@a.deep.sub.example")
    assert r.route("joe@except.sub.example") == (REMOTE, "joe@except.sub.example")
    assert r.route("joe@sub.example") == (REMOTE, "joe@sub.example")
    assert r.unprepend("v-joe@virt.example") == "joe@virt.example"
    assert r.unprepend("subs-joe@a.sub.example") == "joe@a.sub.example"


def test_virtualdomains_catch_all(tmp_path):
    r = routing(tmp_path, me="mx\n", locals="mx\n", virtualdomains=":all\n")
    assert r.route("x@anything.example") == (LOCAL, "all-x@anything.example")
    assert r.route("x@mx") == (LOCAL, "x@mx")


def test_percenthack(tmp_path):
    r = routing(tmp_path, me="mx\n", percenthack="relay.example\n")
    assert r.route("joe%far.example@relay.example") == (REMOTE, "joe@far.example")
    assert r.route("a%b%c.example@relay.example") == (REMOTE, "a%b@c.example")
    assert r.route("joe%far.example@other.example") == (REMOTE, "joe%far.example@other.example")


def test_retry_schedule_is_quadratic_from_birth():
    birth = 1_000_000.0
    assert schedule.next_retry(birth, birth, "local") == birth + 100
    assert schedule.next_retry(birth, birth + 100, "local") == birth + 400
    assert schedule.next_retry(birth, birth + 400, "local") == birth + 900
    assert schedule.next_retry(birth, birth, "remote") == birth + 400
    assert schedule.next_retry(birth, birth + 400, "remote") == birth + 1600
    # a late pass recomputes from the real age
    late = birth + 5000
    assert schedule.next_retry(birth, late, "local") == birth + (math.isqrt(5000) + 10) ** 2
    assert not schedule.expired(birth, birth + 604800, 604800)
    assert schedule.expired(birth, birth + 604801, 604800)


def test_bounce_addressing():
    cfg = BounceConfig("MAILER-DAEMON", "mx.example", "postmaster", "mx.example")
    p = decide("joe@a.example", cfg)
    assert (p.sender, p.recipient, p.double) == ("", "joe@a.example", False)
    p = decide("list-owner-@a.example-@[]", cfg)
    assert p.recipient == "list-owner-@a.example"
    p = decide("", cfg)
    assert (p.sender, p.recipient, p.double) == ("#@[]", "postmaster@mx.example", True)
    assert decide("#@[]", cfg) is None


def test_bounce_is_qsbmf():
    cfg = BounceConfig("MAILER-DAEMON", "mx.example", "postmaster", "mx.example")
    head = compose_head(decide("joe@a.example", cfg), "joe@a.example",
                        b"<bad@mx.example>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n", cfg, now=0)
    text = head.decode()
    header, body = text.split("\n\n", 1)
    assert "Date: 1 Jan 1970 00:00:00 -0000" in header
    assert "From: MAILER-DAEMON@mx.example" in header
    assert "To: joe@a.example" in header and "Subject: failure notice" in header
    assert "Message-ID" not in header
    paras = body.split("\n\n")
    assert paras[0].startswith("Hi. This is the qmail-send program at mx.example.")
    assert paras[1].startswith("<bad@mx.example>:\n") and "(#5.1.1)" in paras[1]
    assert paras[2].startswith("-")
    assert body.endswith("\n\nReturn-Path: <joe@a.example>\n")
