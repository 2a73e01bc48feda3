"""Routing, MX planning, the loop check, TLS policy, control files and tcpto's rules, without sockets."""

import ipaddress
import random
import struct

import pytest
from hypothesis import given, settings, strategies as st

from miniqmail.control import Control, ControlError
from smarthost import evloop
from smarthost.remote.config import RemoteConfig, parse_resolver
from smarthost.remote.ipme import ipme
from smarthost.remote.mx import DnsNonexistent, DnsTemporary, plan
from smarthost.remote.report import Outcome
from smarthost.remote.routing import DomainMap, Relay, mxps_qmtp, order, parse_ip, parse_relay, route
from smarthost.remote.tcpto import V4, V6, Table, window
from smarthost.remote.tlspolicy import TlsMode, TlsPolicy

ip = ipaddress.ip_address


def test_domain_map_lookup_order_like_qmail_remote():
    m = DomainMap(["example.test:exact", ".example.test:suffix", ".test:tld", ":default", "no colon here",
                   "EXAMPLE.test:last wins"])
    assert m.lookup("Example.Test") == "last wins"
    assert m.lookup("a.b.example.test") == "suffix"
    assert m.lookup("other.test") == "tld"
    assert m.lookup("example.org") == "default"
    assert DomainMap(None).lookup("x") is None


def test_relays_and_literals():
    assert parse_relay("mx.example.test:2525") == Relay("mx.example.test", 2525)
    assert parse_relay("[10.0.0.1]") == Relay("[10.0.0.1]", None)
    assert parse_relay("[::1]:26") == Relay("[::1]", 26)
    assert parse_relay("relay:99999") == Relay("relay", None)
    assert parse_relay("") is None and parse_relay("  ") is None
    assert parse_ip("[IPv6:2001:db8::1]") == ip("2001:db8::1")
    assert parse_ip("192.0.2.1") == ip("192.0.2.1") and parse_ip("mx.test") is None


def test_route_prefers_qmtproutes_and_honours_exceptions():
    smtp = DomainMap([":smart.test", "direct.test:"])
    qmtp = DomainMap(["q.test:qrelay.test:210", "noq.q.test:"])
    assert route("q.test", smtp, qmtp).qmtp and route("q.test", smtp, qmtp).relay == Relay("qrelay.test", 210)
    assert route("noq.q.test", smtp, qmtp) == route("other.test", smtp, qmtp)
    assert route("other.test", smtp, qmtp).relay == Relay("smart.test", None)
    assert route("direct.test", smtp, qmtp).relay is None


def test_mxps_slice():
    assert [p for p in range(12700, 13100) if mxps_qmtp(p)] == list(range(12801, 13042, 16))


def test_equal_preferences_shuffle_and_lower_ones_come_first():
    mxs = [(20, "c"), (10, "a"), (10, "b"), (30, "d")]
    seen = set()
    for seed in range(40):
        got = order(mxs, random.Random(seed))
        assert [p for p, _ in got] == [10, 10, 20, 30]
        seen.add(got[0][1])
    assert seen == {"a", "b"}


class FakeDns:
    def __init__(self, mx=None, hosts=None):
        self.mxs, self.hosts = mx or {}, hosts or {}

    async def mx(self, name):
        v = self.mxs.get(name, DnsNonexistent(name))
        if isinstance(v, Exception):
            raise v
        return v

    async def addresses(self, name):
        v = self.hosts.get(name, [])
        if isinstance(v, Exception):
            raise v
        return [ip(a) for a in v]


def run_plan(dns, domain, smtp=(), qmtp=(), me=("192.0.2.1",)):
    rt = route(domain, DomainMap(list(smtp)), DomainMap(list(qmtp)))
    return evloop.run(plan(dns, domain, rt, 25, 209, lambda: frozenset(map(ip, me)), random.Random(1)))


def test_plan_mx_order_families_and_mxps():
    dns = FakeDns({"d.test": [(20, "b.d.test"), (12801, "q.d.test"), (10, "a.d.test")]},
                  {"a.d.test": ["10.0.0.1", "2001:db8::1"], "b.d.test": ["10.0.0.2", "10.0.0.1"],
                   "q.d.test": ["10.0.0.3"]})
    got = run_plan(dns, "d.test")
    assert [(str(t.ip), t.pref, t.qmtp) for t in got] == [
        ("10.0.0.1", 10, False), ("2001:db8::1", 10, False), ("10.0.0.2", 20, False), ("10.0.0.3", 12801, True)]


def test_plan_failures():
    assert run_plan(FakeDns({"t.test": DnsTemporary()}), "t.test").text.endswith("(#4.1.2)\n")
    assert "named n.test." in run_plan(FakeDns(), "n.test").text
    assert run_plan(FakeDns({"z.test": None}), "z.test").letter == "D"  # null MX
    # one exchanger that does not resolve now is fine when another does
    soft = FakeDns({"s.test": [(10, "a.s.test"), (20, "b.s.test")]}, {"a.s.test": DnsTemporary(), "b.s.test": ["10.0.0.9"]})
    assert [str(t.ip) for t in run_plan(soft, "s.test")] == ["10.0.0.9"]
    allsoft = FakeDns({"s.test": [(10, "a.s.test")]}, {"a.s.test": DnsTemporary()})
    assert run_plan(allsoft, "s.test").letter == "Z"
    empty = FakeDns({"e.test": [(10, "a.e.test")]}, {"a.e.test": []})
    assert run_plan(empty, "e.test").text.endswith("(#5.4.4)\n")


def test_plan_loop_check_and_relays():
    dns = FakeDns({"l.test": [(10, "me.l.test"), (5, "up.l.test"), (20, "down.l.test")]},
                  {"me.l.test": ["192.0.2.1"], "up.l.test": ["10.0.0.5"], "down.l.test": ["10.0.0.6"]})
    assert [str(t.ip) for t in run_plan(dns, "l.test")] == ["10.0.0.5"]
    best = FakeDns({"b.test": [(10, "me.b.test")]}, {"me.b.test": ["192.0.2.1"]})
    out = run_plan(best, "b.test")
    assert isinstance(out, Outcome) and out.letter == "D" and "(#5.4.6)" in out.text
    # a relay is never loop-checked, and needs no MX
    got = run_plan(FakeDns(), "any.test", smtp=[":[192.0.2.1]:2525"])
    assert [(str(t.ip), t.smtp_port) for t in got] == [("192.0.2.1", 2525)]
    got = run_plan(FakeDns(), "any.test", qmtp=[":[10.0.0.1]:2209"])
    assert [(t.qmtp, t.qmtp_port, t.smtp_port) for t in got] == [(True, 2209, 25)]
    assert run_plan(FakeDns(), "[192.0.2.1]").letter == "D"
    assert [str(t.ip) for t in run_plan(FakeDns(), "[10.1.2.3]")] == ["10.1.2.3"]


def test_ipme_has_loopback_and_the_corrections():
    me = ipme(["203.0.113.5"], ["127.0.0.1"])
    assert ip("203.0.113.5") in me and ip("0.0.0.0") in me and ip("127.0.0.1") not in me
    assert ip("127.0.0.1") in ipme()


def test_tls_policy_lookup():
    p = TlsPolicy(["bank.test:verify", ".corp.test:encrypt", "old.test:none", "typo.test:verfy"])
    assert p.mode("bank.test") is TlsMode.VERIFY and p.mode("a.corp.test") is TlsMode.ENCRYPT
    assert p.mode("old.test") is TlsMode.NONE and p.mode("other.test") is TlsMode.MAY
    assert p.mode("typo.test") is TlsMode.VERIFY  # an unknown word never lowers security
    assert TlsPolicy([":encrypt"]).mode("x.test") is TlsMode.ENCRYPT


def test_resolver_lines():
    assert parse_resolver("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_resolver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_resolver("[::1]:5353") == ("::1", 5353)
    assert parse_resolver("2001:db8::53") == ("2001:db8::53", 53)
    assert parse_resolver("dns.example") is None and parse_resolver("1.2.3.4:x") is None


def test_config_defaults_and_errors(tmp_path):
    ctl = tmp_path / "control"
    ctl.mkdir()
    (ctl / "me").write_text("me.test\n")
    cfg = RemoteConfig.from_control(Control(str(ctl)))
    assert (cfg.helohost, cfg.timeoutconnect, cfg.timeoutremote, cfg.smtpport, cfg.qmtpport) == \
        ("me.test", 60, 1200, 25, 209)
    assert cfg.resolvers is None and cfg.tlsca is None
    (ctl / "helohost").write_text("helo.test\n")
    (ctl / "smtpport").write_text("70000\n")
    assert RemoteConfig.from_control(Control(str(ctl))).helohost == "helo.test"
    assert RemoteConfig.from_control(Control(str(ctl))).smtpport == 25
    (ctl / "helohost").unlink()
    (ctl / "me").unlink()
    with pytest.raises(ControlError):
        RemoteConfig.from_control(Control(str(ctl)))


A, B = ip("192.0.2.1").packed, ip("192.0.2.2").packed


def test_tcpto_counts_only_timeouts_two_minutes_apart():
    t = Table(b"", V4)
    assert not t.note(A, False, 1000)                     # success with no record: nothing to do
    assert t.note(A, True, 1000)
    assert t.entries() == [(A, 1, 1000)]
    assert not t.note(A, True, 1100)                      # within 120 s: ignored
    assert not t.parked(A, 1100, 0)
    assert t.note(A, True, 1120)
    assert t.entries() == [(A, 2, 1120)]
    assert t.parked(A, 1120 + window(0) - 1, 0) and not t.parked(A, 1120 + window(0), 0)
    assert window(0) == 3840 and window(31) == 5824       # 64 to 97 minutes
    assert t.note(A, False, 1200) and not t.parked(A, 1201, 0)  # a connection clears it
    for n in range(20):
        t.note(B, True, 2000 + 200 * n)
    assert t.find(B) is not None and t.entries()[-1][1] == 10  # the count stops at 10


def test_tcpto_record_layout_is_qmails():
    t = Table(b"", V4)
    t.note(A, True, 0x01020304)
    rec = bytes(t.data[:16])
    assert rec == A + b"\x01\0\0\0" + struct.pack("<I", 0x01020304) + b"\0" * 4
    assert len(t.data) == 1024
    t6 = Table(b"", V6)
    t6.note(ip("2001:db8::1").packed, True, 7)
    assert len(t6.data) == 2048 and t6.data[16] == 1 and struct.unpack_from("<I", t6.data, 20)[0] == 7


def test_tcpto_evicts_the_oldest_when_full():
    t = Table(b"", V4)
    for i in range(64):
        t.note(bytes([10, 0, 0, i]), True, 10_000 + i)
    t.note(bytes([10, 0, 1, 0]), True, 20_000)
    assert t.find(bytes([10, 0, 0, 0])) is None and t.find(bytes([10, 0, 1, 0])) == 0


@given(st.binary(max_size=64 * 16), st.binary(min_size=4, max_size=4), st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_tcpto_finds_an_address_only_at_the_start_of_a_record(before, addr, after):
    t = Table(before + addr + after, V4)  # the address somewhere, aligned or not
    naive = next((i for i in range(64) if bytes(t.data[i * 16:i * 16 + 4]) == addr), None)
    assert t.find(addr) == naive
