"""tcprules: syntax, ranges, cdb bytes against ucspi-tcp's own tcprules, rules.c's match order,
IPv6, the `tcprules` program, `smarthost rules`, and reloading a changed cdb."""

import os
import shutil
import subprocess
import sys

import pytest

from smarthost import cdb, tcprules
from smarthost.tcprules import Decision, Rule, RulesSyntaxError, match, normalize_ip, parse_line
from tests.conftest import program

pytestmark = pytest.mark.timeout(60)

SAMPLE = (b'1.2.3.4-6:allow,A="x",B=/y/\n# comment:deny\n  # not a comment:allow\n\n'
          b'1.2.0-2.:deny\n:allow\n=foo.bar:deny,X=""\n=:allow\nu@1.2.3.4:deny\nu@=h:allow\n'
          b'1.2.3.250-300:allow\n1.2.3.4:deny\nno colon here\n10.0.0.1:allow  \t\n')

# What ucspi-tcp 0.88's tcprules writes for SAMPLE (observed), in file order.
SAMPLE_RECORDS = [
    (b"1.2.3.4", b"+A=x\0+B=y\0"), (b"1.2.3.5", b"+A=x\0+B=y\0"), (b"1.2.3.6", b"+A=x\0+B=y\0"),
    (b"  # not a comment", b""), (b"1.2.0.", b"D\0"), (b"1.2.1.", b"D\0"), (b"1.2.2.", b"D\0"),
    (b"", b""), (b"=foo.bar", b"D\0+X=\0"), (b"=", b""), (b"u@1.2.3.4", b"D\0"), (b"u@=h", b""),
    *[(b"1.2.3.%d" % n, b"") for n in range(250, 256)], (b"1.2.3.4", b"D\0"), (b"10.0.0.1", b""),
]

BAD = [b"1.2.3.4:allowx", b"1.2.3.4:allow,A", b"1.2.3.4:allow,A=", b'1.2.3.4:allow,A="x', b"1.2.3.4:Allow",
       b"a-b.c:allow", b"1.a-3.:allow", b"x:deny\r", b'1.2.3.4:allow,A="x",', b"1.2.3.4:allow:deny",
       b"1.2.3.4-5-6.7:deny", b"x:allowance:deny", b"fe80::1-3:allow"]

IPV4_ONLY_INPUTS = [SAMPLE, b"a:allow\nb:deny", b"1.2-.:allow\n", b"-5.:allow\n", b"5-3.:allow\n",
                    b"1.2.3.04-06:allow,,=,v,\n", b"1.2.3.4:allow,A=,,\n", b"\n\n#x\n", b"",
                    b'u@1.2.3.1-3:deny\n1.2.3.4:deny,A="1",A="2"\n1.2.3.4:allow\n']


def compiled(tmp_path, text: bytes) -> list[tuple[bytes, bytes]]:
    path = str(tmp_path / "r.cdb")
    tcprules.compile_rules(tcprules.split_lines(text), path)
    with cdb.Reader(path) as r:
        return [(bytes(k), bytes(v)) for k, v in r.items()]


def command(script: str, module: str) -> list[str]:
    path = program(script)
    return [path] if os.path.exists(path) else [sys.executable, "-m", module]


def test_sample_compiles_like_ucspi_tcp(tmp_path):
    assert compiled(tmp_path, SAMPLE) == SAMPLE_RECORDS


@pytest.mark.parametrize("line", BAD)
def test_unparsable_lines(line):
    with pytest.raises(RulesSyntaxError, match="unable to parse this line: "):
        parse_line(line + b"\n")


def test_any_quote_character_and_empty_values():
    assert parse_line(b"1.2.3.:allow,A=|a,b|,B=,x,,C=\"\",D=aba\n") == Rule(
        b"1.2.3.", True, ((b"A", b"a,b"), (b"B", b"x"), (b"C", b""), (b"D", b"b")))
    assert parse_line(b"# 1.2.3.4:deny") is None and parse_line(b"   \t\n") is None
    assert parse_line(b"nocolon") is None


@pytest.mark.parametrize("address,keys", [
    (b"1.2.3.4-6", [b"1.2.3.4", b"1.2.3.5", b"1.2.3.6"]),
    (b"10.0-2.", [b"10.0.", b"10.1.", b"10.2."]),
    (b"1.2.3.254-999", [b"1.2.3.254", b"1.2.3.255"]),
    (b"1.2.3.9-3", []),
    (b"1.2.-1.", [b"1.2.0.", b"1.2.1."]),
    (b"=a-b.example", [b"=a-b.example"]),
    (b"joe-x@1.2.3.4", [b"joe-x@1.2.3.4"]),
])
def test_ranges(address, keys):
    assert tcprules.expand(address) == keys


def test_ipv6_rules_split_at_the_colon_before_allow_or_deny():
    assert parse_line(b'::1:allow,A="x"') == Rule(b"::1", True, ((b"A", b"x"),))
    assert parse_line(b"2001:db8::deny") == Rule(b"2001:db8:", False)
    assert parse_line(b":::deny") == Rule(b"::", False)
    assert parse_line(b"1:2:deny") == Rule(b"1:2", False)


# -- rules.c's match order -------------------------------------------------------

ORDER = [b"joe@10.1.2.3", b"joe@=ws.dept.example", b"10.1.2.3", b"=ws.dept.example", b"10.1.2.", b"10.1.",
         b"10.", b"=.dept.example", b"=.example", b"=", b""]


@pytest.mark.parametrize("first", range(len(ORDER)))
def test_match_order(first):
    rules = [Rule(key, True, ((b"HIT", key),)) for key in ORDER[first:]]
    rules.reverse()  # file order does not matter across different keys
    d = match(rules, "10.1.2.3", host="ws.dept.example", info="joe")
    assert d == Decision(True, {"HIT": ORDER[first].decode()}, ORDER[first])


def test_match_without_host_or_info_skips_their_keys():
    rules = [Rule(b"joe@10.1.2.3", False), Rule(b"=", False), Rule(b"10.1.", True, ((b"X", b"1"),))]
    assert match(rules, "10.1.2.3") == Decision(True, {"X": "1"}, b"10.1.")
    assert match(rules, "192.0.2.1") == Decision(True)  # nothing matches: allow
    assert match([Rule(b"", False)], "192.0.2.1") == Decision(False, {}, b"")


def test_first_line_wins_and_deny_keeps_its_variables(tmp_path):
    path = str(tmp_path / "r.cdb")
    tcprules.compile_rules([b'1.2.3.4:deny,A="1",A="2"\n', b"1.2.3.4:allow\n"], path)
    with cdb.Reader(path) as r:
        assert match(r, "1.2.3.4") == Decision(False, {"A": "2"}, b"1.2.3.4")


def test_ipv6_prefixes_and_mapped_addresses():
    rules = [Rule(b"2001:db8:", True, ((b"NET", b"doc"),)), Rule(b"::1", True), Rule(b"", False)]
    assert match(rules, "2001:db8::25").env == {"NET": "doc"}
    assert match(rules, "::1").rule == b"::1" and not match(rules, "2001:db9::1").allow
    assert normalize_ip("::ffff:127.0.0.2") == "127.0.0.2"
    assert normalize_ip("2001:0db8:0000::0001") == "2001:db8::1" and normalize_ip("fe80::1%lo") == "fe80::1"


def test_watcher_reopens_a_changed_cdb(tmp_path):
    path = str(tmp_path / "qmqp.cdb")
    w = tcprules.RulesWatcher(path)
    assert w.current() is None
    tcprules.compile_rules([b"127.0.0.1:deny\n"], path)
    assert not match(w.current(), "127.0.0.1").allow
    tcprules.compile_rules([b"127.0.0.1:allow\n"], path)
    assert match(w.current(), "127.0.0.1").allow
    os.unlink(path)
    assert w.current() is None


# -- against ucspi-tcp's programs ------------------------------------------------------

def ucspi(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} not installed (Debian package ucspi-tcp; .ci/run installs it)")
    return path


def theirs(binary: str, text: bytes, tmp_path) -> tuple[int, bytes | None, bytes]:
    out, tmp = tmp_path / "theirs.cdb", tmp_path / "theirs.tmp"
    for p in (out, tmp):
        p.unlink(missing_ok=True)
    p = subprocess.run([binary, str(out), str(tmp)], input=text, capture_output=True, timeout=10)
    return p.returncode, out.read_bytes() if out.exists() else None, p.stderr


def ours(text: bytes, tmp_path) -> tuple[int, bytes | None, bytes]:
    out, tmp = tmp_path / "ours.cdb", tmp_path / "ours.tmp"
    for p in (out, tmp):
        p.unlink(missing_ok=True)
    p = subprocess.run([*command("tcprules", "smarthost.cli.tcprules"), str(out), str(tmp)], input=text,
                       capture_output=True, timeout=30)
    assert not tmp.exists()
    return p.returncode, out.read_bytes() if out.exists() else None, p.stderr


@pytest.mark.parametrize("text", IPV4_ONLY_INPUTS + [line + b"\n" for line in BAD[:-2]])
def test_same_bytes_and_errors_as_ucspi_tcprules(text, tmp_path):
    assert ours(text, tmp_path) == theirs(ucspi("tcprules"), text, tmp_path)


def test_ipv6_same_bytes_as_the_ipv6_patched_tcprules(tmp_path):
    unpacked = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "var", "peers", "ucspi-tcp-ipv6", "usr", "bin", "tcprules")
    binary = os.environ.get("TCPRULES_IPV6") or unpacked
    if not os.path.exists(binary):
        pytest.skip("no IPv6 tcprules: .ci/run unpacks Debian's ucspi-tcp-ipv6 (it conflicts with "
                    "ucspi-tcp) into var/peers, or set TCPRULES_IPV6")
    text = b'::1:allow,A="x"\n2001:db8::deny\n:::deny\n1:2:deny\n1.2.3.4-6:allow\n:allow\n'
    assert ours(text, tmp_path) == theirs(binary, text, tmp_path)


def test_match_agrees_with_tcprulescheck(tmp_path):
    check = ucspi("tcprulescheck")
    path = str(tmp_path / "r.cdb")
    tcprules.compile_rules(tcprules.split_lines(SAMPLE + b"9.8.:deny\n=.example:allow,E=.x.\n"), path)
    queries = [("1.2.3.5", None, None), ("1.2.1.9", None, None), ("1.2.3.4", None, "u"), ("7.7.7.7", "h", "u"),
               ("7.7.7.7", "foo.bar", None), ("7.7.7.7", "a.example", None), ("9.8.7.6", None, None),
               ("1.2.3.251", None, None), ("7.7.7.7", None, None)]
    with cdb.Reader(path) as r:
        for ip, host, info in queries:
            env = {k: v for k, v in os.environ.items() if not k.startswith("TCP")}
            env.update({"TCPREMOTEIP": ip, **({"TCPREMOTEHOST": host} if host else {}),
                        **({"TCPREMOTEINFO": info} if info else {})})
            out = subprocess.run([check, path], capture_output=True, text=True, env=env, timeout=10).stdout
            d = match(r, ip, host, info)
            first = out.splitlines()[0]
            assert first == ("default:" if d.rule is None else f"rule {d.rule.decode()}:"), (ip, out)
            assert out.rstrip().endswith("allow connection" if d.allow else "deny connection")


# -- our tcprules program --------------------------------------------------------------

def test_tcprules_program_usage_and_failures(tmp_path):
    prog = command("tcprules", "smarthost.cli.tcprules")
    p = subprocess.run(prog, capture_output=True, text=True, timeout=30)
    assert (p.returncode, p.stderr) == (100, "tcprules: usage: tcprules rules.cdb rules.tmp\n")
    good = tmp_path / "r.cdb"
    subprocess.run([*prog, str(good), str(tmp_path / "r.tmp")], input=b"1.2.3.4:deny\n", check=True, timeout=30)
    before = good.read_bytes()
    p = subprocess.run([*prog, str(good), str(tmp_path / "r.tmp")], input="1.2.3.4:allow\nbad:line\n",
                       capture_output=True, text=True, timeout=30)
    assert (p.returncode, p.stderr) == (100, "tcprules: fatal: unable to parse this line: bad:line\n")
    assert good.read_bytes() == before and not (tmp_path / "r.tmp").exists()
    p = subprocess.run([*prog, str(good), str(tmp_path / "no" / "r.tmp")], input="", capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 111 and p.stderr.startswith(f"tcprules: fatal: unable to create {tmp_path}/no/r.tmp: ")
    (tmp_path / "dir").mkdir()
    p = subprocess.run([*prog, str(tmp_path / "dir"), str(tmp_path / "x.tmp")], input="", capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 111 and "unable to move" in p.stderr and p.stderr.count("\n") == 1


# -- smarthost rules -------------------------------------------------------------------

def rules_cmd(root, *args):
    return subprocess.run([program("smarthost"), "rules", *args, "--root", root.path], capture_output=True,
                          text=True, timeout=30)


def test_rules_admin_commands(root):
    rules_path, cdb_path = root.sub("rules", "qmqp.rules"), root.sub("rules", "qmqp.cdb")
    p = rules_cmd(root, "list")
    assert p.returncode == 0 and "only 127.0.0.1 and ::1" in p.stdout
    p = rules_cmd(root, "allow", "10.0.0.", "DATABYTES=1000000", "NOTE=a \"quoted\" value")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "10.0.0.:allow,DATABYTES=\"1000000\",NOTE='a \"quoted\" value'\n"
    text = open(rules_path, "rb").read()
    assert text.endswith(b"127.0.0.1:allow\n::1:allow\n" + p.stdout.encode() + b":deny\n")
    with cdb.Reader(cdb_path) as r:
        assert match(r, "10.0.0.7").env == {"DATABYTES": "1000000", "NOTE": 'a "quoted" value'}
        assert not match(r, "192.0.2.1").allow and match(r, "::1").allow
    with open(rules_path, "ab") as f:
        f.write(b"# a comment the admin wrote\n")
    assert rules_cmd(root, "deny", "10.0.0.").returncode == 0
    assert rules_cmd(root, "allow", "", "X=1").returncode == 0     # the default line, replaced in place
    assert rules_cmd(root, "deny", "192.0.2.1-9").returncode == 0  # before the default
    lines = open(rules_path, "rb").read().splitlines()
    assert lines[2:] == [b"127.0.0.1:allow", b"::1:allow", b"10.0.0.:deny", b"192.0.2.1-9:deny",
                         b':allow,X="1"', b"# a comment the admin wrote"]
    with cdb.Reader(cdb_path) as r:
        assert not match(r, "192.0.2.5").allow and match(r, "192.0.2.10").env == {"X": "1"}
    p = rules_cmd(root, "list")
    assert p.stdout.splitlines()[-2:] == [':allow,X="1"', "# a comment the admin wrote"] and p.stderr == ""


@pytest.mark.parametrize("args,words", [(["allow", "1.2.3.4:deny"], "cannot be written"),
                                        (["allow", "1.2.3.4", "NOEQUALS"], "is not VAR=value"),
                                        (["deny", "#1.2.3.4"], "unusable address"),
                                        (["allow", "1.2.x-3.4"], "unable to parse")])
def test_rules_admin_refuses_what_it_cannot_write(root, args, words):
    p = rules_cmd(root, *args)
    assert p.returncode in (1, 2) and words in p.stderr and "Traceback" not in p.stderr
    assert not os.path.exists(root.sub("rules", "qmqp.cdb"))


def test_rules_compile_after_editing_by_hand(root):
    with open(root.sub("rules", "qmqp.rules"), "wb") as f:
        f.write(b"127.0.0.1:allow\n10.1-3.:allow\n:deny\n")
    p = rules_cmd(root, "compile")
    assert p.returncode == 0 and p.stdout.endswith("qmqp.cdb: 5 keys\n")
    with cdb.Reader(root.sub("rules", "qmqp.cdb")) as r:
        assert match(r, "10.2.0.1").rule == b"10.2." and not match(r, "10.4.0.1").allow


def test_rules_admin_leaves_a_broken_file_alone(root):
    path = root.sub("rules", "qmqp.rules")
    with open(path, "wb") as f:
        f.write(b"1.2.3.4:maybe\n")
    p = rules_cmd(root, "allow", "10.")
    assert p.returncode == 1 and "unable to parse this line: 1.2.3.4:maybe" in p.stderr
    assert open(path, "rb").read() == b"1.2.3.4:maybe\n"


def test_set_rule_text_edits():
    assert tcprules.set_rule(b"", b"1.2.3.4:deny") == b"1.2.3.4:deny\n"
    assert tcprules.set_rule(b"# c\n:deny", b"1.2.:allow") == b"# c\n1.2.:allow\n:deny\n"
    assert tcprules.set_rule(b"a:allow\n#x\na:deny\n", b"a:deny") == b"a:deny\n#x\na:deny\n"
    assert tcprules.set_rule(b"x:allow", b"y:allow") == b"x:allow\ny:allow\n"


def _slow_normalize(ip: str) -> str:
    import ipaddress
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


def test_dotted_digits_are_kept_as_they_are_valid_or_not():
    from hypothesis import given, strategies as st

    @given(st.lists(st.text("0123456789", min_size=1, max_size=4), min_size=4, max_size=4))
    def check(parts):
        ip = ".".join(parts)
        assert normalize_ip(ip) == _slow_normalize(ip) == ip

    check()
    assert normalize_ip("192.0.2.7") == "192.0.2.7" and normalize_ip("01.2.3.4") == "01.2.3.4"
    assert normalize_ip("1.2.3.4.5") == "1.2.3.4.5" and normalize_ip("1.2.3") == "1.2.3"
