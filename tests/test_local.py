"""qmail-local semantics: real homes in tmp dirs, real /bin/sh programs, a recording inject."""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from miniqmail import maildir
from smarthost import dotqmail
from smarthost.local import LocalRequest, LocalResult, deliver

MESSAGE = (b"Received: (qmail 1 invoked by uid 0); 1 Jan 1970 00:00:00 -0000\n"
           b"Subject: test\n\nFrom the body\nDelivered-To: joe@example.com\n")
DT = b"Delivered-To: joe@example.com\n"
RP = b"Return-Path: <alice@example.org>\n"
DUMP_ENV = (f"|{sys.executable} -c \"import os, json; "
            f"json.dump(dict(os.environ), open('env.json', 'w'))\"")


class Inject:
    """The caller's side of the forwarding contract: record and answer."""

    def __init__(self, answer: tuple[int, str] = (0, "4242")):
        self.answer = answer
        self.calls: list[tuple[bytes, bytes, str, list[str]]] = []

    def __call__(self, prefix, message, newsender, recipients):
        self.calls.append((prefix, message.read(), newsender, list(recipients)))
        return self.answer


@pytest.fixture
def home(tmp_path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    h.chmod(0o755)
    return h


@pytest.fixture
def msgfile(tmp_path) -> Path:
    p = tmp_path / "mess"
    p.write_bytes(MESSAGE)
    return p


def req(home_: Path, **kw) -> LocalRequest:
    base = dict(user="joe", uid=os.getuid(), gid=os.getgid(), home=str(home_), local="joe",
                dash="", ext="", domain="example.com", sender="alice@example.org",
                defaultdelivery="./Maildir/", env={"PATH": "/usr/bin:/bin"})
    base.update(kw)
    return LocalRequest(**base)  # type: ignore[arg-type]


def run(home_: Path, msgfile: Path, inject: Inject | None = None, **kw) -> LocalResult:
    with open(msgfile, "rb") as m:
        return deliver(req(home_, **kw), m, inject or Inject())


def dotq(home: Path, name: str, text: str, mode: int = 0o644) -> None:
    p = home / name
    p.write_text(text)
    p.chmod(mode)


def maildir_messages(path: Path) -> list[bytes]:
    return [f.read_bytes() for f in (path / "new").iterdir()]


# --- storage lines -------------------------------------------------------------

def test_default_delivery_to_maildir(home, msgfile):
    maildir.make(str(home / "Maildir"))
    r = run(home, msgfile)
    assert r == LocalResult(0, "did 1+0+0\n")
    assert maildir_messages(home / "Maildir") == [RP + DT + MESSAGE]


def test_empty_dotqmail_uses_default_delivery(home, msgfile):
    maildir.make(str(home / "Maildir"))
    dotq(home, ".qmail", "")
    assert run(home, msgfile).code == 0
    assert len(maildir_messages(home / "Maildir")) == 1


def test_mbox_line(home, msgfile):
    dotq(home, ".qmail", "# my mail\n./Mailbox  \t\n")
    r = run(home, msgfile)
    assert r == LocalResult(0, "did 1+0+0\n")
    data = (home / "Mailbox").read_bytes()
    assert data.startswith(b"From alice@example.org ")
    assert data.split(b"\n", 1)[1] == RP + DT + MESSAGE.replace(b"\nFrom the", b"\n>From the") + b"\n"


def test_missing_maildir_defers(home, msgfile):
    r = run(home, msgfile)
    assert r == LocalResult(111, "Unable to chdir to maildir. (#4.2.1)\n")


def test_locked_mbox_defers(home, msgfile):
    dotq(home, ".qmail", "./Mailbox\n")
    with open(home / "Mailbox", "ab") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        r = run(home, msgfile, lock_timeout=0.5)
    assert r.code == 111 and "File has been locked for 0.5 seconds straight. (#4.3.0)" in r.text
    assert (home / "Mailbox").read_bytes() == b""


# --- programs ------------------------------------------------------------------

def test_program_environment_and_stdin(home, msgfile):
    dotq(home, ".qmail-list-default", f"|cat > stdin.out\n{DUMP_ENV}\n")
    r = run(home, msgfile, local="joe-List-Foo.Bar", dash="-", ext="List-Foo.Bar",
            domain="mail.example.co.uk", env={"PATH": "/usr/bin:/bin", "DEFAULT": "stale"})
    assert r == LocalResult(0, "did 0+0+2\n")
    assert (home / "stdin.out").read_bytes() == MESSAGE
    env = json.loads((home / "env.json").read_text())
    assert env["PATH"] == "/usr/bin:/bin"
    expect = {
        "SENDER": "alice@example.org", "NEWSENDER": "alice@example.org",
        "RECIPIENT": "joe-List-Foo.Bar@mail.example.co.uk", "USER": "joe", "HOME": str(home),
        "HOST": "mail.example.co.uk", "HOST2": "mail.example.co", "HOST3": "mail.example",
        "HOST4": "mail", "LOCAL": "joe-List-Foo.Bar", "EXT": "List-Foo.Bar", "EXT2": "Foo.Bar",
        "EXT3": "", "EXT4": "", "DEFAULT": "Foo.Bar",
        "DTLINE": "Delivered-To: joe-List-Foo.Bar@mail.example.co.uk\n",
        "RPLINE": "Return-Path: <alice@example.org>\n",
    }
    assert {k: env.get(k) for k in expect} == expect
    assert env["UFLINE"].startswith("From alice@example.org ") and env["UFLINE"].endswith("\n")


def test_program_without_default_file_has_no_default(home, msgfile):
    dotq(home, ".qmail-x", f"{DUMP_ENV}\n")
    assert run(home, msgfile, dash="-", ext="x", env={"DEFAULT": "inherited"}).code == 0
    env = json.loads((home / "env.json").read_text())
    assert "DEFAULT" not in env and env["EXT"] == "x"


@pytest.mark.parametrize("status,code", [(0, 0), (100, 100), (64, 100), (112, 100),
                                         (111, 111), (1, 111), (75, 111)])
def test_program_exit_mapping(home, msgfile, status, code):
    dotq(home, ".qmail", f"|echo said {status}; exit {status}\n")
    r = run(home, msgfile)
    assert r.code == code
    assert r.text.startswith(f"said {status}\n")
    if code == 0:
        assert r.text == "said 0\ndid 0+0+1\n"


def test_exit_99_stops_later_lines_but_forwards_earlier(home, msgfile):
    dotq(home, ".qmail", "&first@example.net\n|exit 99\n./Mailbox\nlater@example.net\n")
    inj = Inject()
    r = run(home, msgfile, inj)
    assert r == LocalResult(0, "did 0+1+1\nqp 4242\n")
    assert not (home / "Mailbox").exists()
    assert [c[3] for c in inj.calls] == [["first@example.net"]]


def test_program_killed_by_signal_defers(home, msgfile):
    dotq(home, ".qmail", "|kill -9 $$\n")
    r = run(home, msgfile)
    assert r == LocalResult(111, "Aack, child crashed. (#4.3.0)\n")


def test_program_output_is_bounded_and_program_not_blocked(home, msgfile):
    dotq(home, ".qmail", "|head -c 200000 /dev/zero | tr '\\0' a; exit 100\n")
    r = run(home, msgfile)
    assert r.code == 100 and r.text == "a" * 3000


def test_each_program_reads_the_whole_message(home, msgfile):
    maildir.make(str(home / "Maildir"))
    dotq(home, ".qmail", "|cat > one\n./Maildir/\n|cat > two\n")
    assert run(home, msgfile) == LocalResult(0, "did 1+0+2\n")
    assert (home / "one").read_bytes() == (home / "two").read_bytes() == MESSAGE


# --- forwarding ----------------------------------------------------------------

def test_forwards_injected_once_at_end(home, msgfile):
    dotq(home, ".qmail", "&a@example.net\nb@example.org\n|echo prog ran\n")
    inj = Inject()
    r = run(home, msgfile, inj)
    assert r == LocalResult(0, "prog ran\ndid 0+2+1\nqp 4242\n")
    assert inj.calls == [(DT, MESSAGE, "alice@example.org", ["a@example.net", "b@example.org"])]


@pytest.mark.parametrize("answer,code", [((31, ""), 100), ((71, ""), 111), ((11, "too long"), 100)])
def test_forward_failure(home, msgfile, answer, code):
    dotq(home, ".qmail", "&a@example.net\n")
    r = run(home, msgfile, Inject(answer))
    assert r.code == code and r.text.startswith("Unable to forward message: ")


def test_forward_owner_newsender(home, msgfile):
    dotq(home, ".qmail-list", "&a@example.net\n")
    dotq(home, ".qmail-list-owner", "&owner@example.net\n")
    inj = Inject()
    assert run(home, msgfile, inj, local="joe-list", dash="-", ext="list").code == 0
    assert inj.calls[0][2] == "joe-list-owner@example.com"
    dotq(home, ".qmail-list-owner-default", "&owner@example.net\n")
    assert run(home, msgfile, inj, local="joe-list", dash="-", ext="list").code == 0
    assert inj.calls[1][2] == "joe-list-owner-@example.com-@[]"
    assert run(home, msgfile, inj, local="joe-list", dash="-", ext="list", sender="").code == 0
    assert inj.calls[2][2] == ""


def test_x_bit_means_forward_only(home, msgfile):
    dotq(home, ".qmail", "&a@example.net\n", mode=0o744)
    assert run(home, msgfile).code == 0
    dotq(home, ".qmail", "./Mailbox\n", mode=0o744)
    assert run(home, msgfile) == LocalResult(
        111, "Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)\n")
    dotq(home, ".qmail", "+list\n|true\n")
    assert run(home, msgfile) == LocalResult(
        111, "Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)\n")


def test_inject_that_breaks_the_contract_defers(home, msgfile):
    dotq(home, ".qmail", "&a@example.net\n")
    with open(msgfile, "rb") as m:
        r = deliver(req(home), m, lambda *a: None)  # type: ignore[arg-type,return-value]
    assert r.code == 111 and r.text.startswith("Unable to forward message")


# --- the checks before delivery ------------------------------------------------

def test_delivered_to_loop(home, msgfile):
    maildir.make(str(home / "Maildir"))
    msgfile.write_bytes(b"Received: x\n" + DT + MESSAGE[MESSAGE.index(b"Subject"):])
    r = run(home, msgfile)
    assert r == LocalResult(
        100, "This message is looping: it already has my Delivered-To line. (#5.4.6)\n")
    assert maildir_messages(home / "Maildir") == []


def test_delivered_to_in_body_or_other_case_is_not_a_loop(home, msgfile):
    maildir.make(str(home / "Maildir"))
    assert run(home, msgfile).code == 0  # MESSAGE has the line, but in the body
    msgfile.write_bytes(b"Delivered-To: Joe@example.com\n" + b"X: " + b"y" * 100_000 + b"\n\n")
    assert run(home, msgfile).code == 0


@pytest.mark.parametrize("mode,text", [
    (0o757, "Uh-oh: home directory is writable. (#4.7.0)\n"),
    (0o775, "Uh-oh: home directory is writable. (#4.7.0)\n"),
    (0o1755, "Home directory is sticky: user is editing his .qmail file. (#4.2.1)\n"),
])
def test_home_permissions_defer(home, msgfile, mode, text):
    home.chmod(mode)
    assert run(home, msgfile) == LocalResult(111, text)


def test_writable_dotqmail_defers(home, msgfile):
    dotq(home, ".qmail", "./Mailbox\n", mode=0o666)
    assert run(home, msgfile) == LocalResult(111, "Uh-oh: .qmail file is writable. (#4.7.0)\n")


def test_blank_first_line_defers(home, msgfile):
    dotq(home, ".qmail", "\n./Mailbox\n")
    assert run(home, msgfile) == LocalResult(
        111, "Uh-oh: first line of .qmail file is blank. (#4.2.1)\n")


def test_no_mailbox_by_that_name(home, msgfile):
    r = run(home, msgfile, local="joe-nobody", dash="-", ext="nobody")
    assert r == LocalResult(100, "Sorry, no mailbox here by that name. (#5.1.1)\n")


def test_relative_or_missing_home_defers(home, msgfile):
    assert run(home, msgfile, home="relative/home").code == 111
    r = run(home, msgfile, home=str(home / "gone"))
    assert r.code == 111 and r.text.startswith("Unable to switch to ")


def test_empty_local_part_delivers_nothing(home, msgfile):
    assert run(home, msgfile, local="").code == 0
    assert os.listdir(home) == []


def test_working_directory_restored(home, msgfile):
    before = os.getcwd()
    dotq(home, ".qmail", "|exit 0\n")
    run(home, msgfile)
    assert os.getcwd() == before


# --- the .qmail search ---------------------------------------------------------

@pytest.mark.parametrize("ext,files,used,default", [
    ("Foo.Bar", [".qmail-foo:bar", ".qmail-default"], ".qmail-foo:bar", None),
    ("foo-Bar-Baz", [".qmail-foo-bar-default", ".qmail-foo-default"], ".qmail-foo-bar-default", "Baz"),
    ("foo-Bar-Baz", [".qmail-foo-default", ".qmail-default"], ".qmail-foo-default", "Bar-Baz"),
    ("foo-Bar", [".qmail-default"], ".qmail-default", "foo-Bar"),
])
def test_search_order(home, msgfile, ext, files, used, default):
    for name in files:
        dotq(home, name, f"|echo {name} \"$DEFAULT\"\n")
    r = run(home, msgfile, local="joe-" + ext, dash="-", ext=ext)
    assert r == LocalResult(0, f"{used} {default or ''}\ndid 0+0+1\n")


def test_candidates():
    names = [c.name for c in dotqmail.candidates("-", "A-b-C")]
    assert names == [".qmail-a-b-c", ".qmail-a-b-default", ".qmail-a-default", ".qmail-default"]
    assert [c.default for c in dotqmail.candidates("-", "A-b-C")] == [None, "C", "b-C", "A-b-C"]
    assert [c.name for c in dotqmail.candidates("", "")] == [".qmail", ".qmaildefault"]
    assert dotqmail.candidates("-", "x-Default")[0].default == "Default"


def test_parse_kinds():
    K = dotqmail.Kind
    got = dotqmail.parse(b"#c\n|prog a\n./Mailbox\n/var/m/\n&a@b\nc@d \t\n\n+list\n+other\n")
    assert [(i.kind, i.value, i.lineno) for i in got] == [
        (K.COMMENT, "#c", 1), (K.PROGRAM, "prog a", 2), (K.MBOX, "./Mailbox", 3),
        (K.MAILDIR, "/var/m/", 4), (K.FORWARD, "a@b", 5), (K.FORWARD, "c@d", 6),
        (K.FORWARD_ONLY, "+list", 8)]
    assert [i.kind for i in dotqmail.parse(b"./Maildir/")] == [K.MAILDIR]


@pytest.mark.parametrize("data", [b"", b"\n", b" \t\nx\n", b"./a\0b\n", b"x\n&\n"])
def test_parse_errors(data):
    with pytest.raises(dotqmail.DotQmailError):
        dotqmail.parse(data)


def test_return_path_quoting():
    assert dotqmail.return_path("") == b"Return-Path: <>\n"
    assert dotqmail.return_path("a b@c") == b'Return-Path: <"a b"@c>\n'
    assert dotqmail.return_path("x.@y@z") == b'Return-Path: <"x.@y"@z>\n'
    assert dotqmail.return_path("a\nb@c") == b'Return-Path: <"a\\_b"@c>\n'


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300) | st.lists(
    st.sampled_from([b"#", b"|", b".", b"/", b"&", b"+list", b"x", b" ", b"\t", b"\n", b"\0",
                     b"@"]), max_size=30).map(b"".join))
def test_parse_any_bytes(data):
    try:
        result = dotqmail.parse(data)
    except dotqmail.DotQmailError as e:
        assert e.text and e.status in ("4.2.1", "4.3.0")
        return
    assert len(result) <= data.count(b"\n") + 1
    for ins in result:
        assert ins.value == ins.value.rstrip(" \t")
        if ins.kind is dotqmail.Kind.FORWARD:
            assert ins.value
        if ins.kind is dotqmail.Kind.MAILDIR:
            assert ins.value.endswith("/")


def test_message_without_descriptor_is_spooled(home):
    import io
    maildir.make(str(home / "Maildir"))
    dotq(home, ".qmail", "./Maildir/\n|cat > stdin.out\n")
    r = deliver(req(home), io.BytesIO(MESSAGE), Inject())
    assert r == LocalResult(0, "did 1+0+1\n")
    assert (home / "stdin.out").read_bytes() == MESSAGE
    assert maildir_messages(home / "Maildir") == [RP + DT + MESSAGE]


def test_unexpected_exception_becomes_a_deferral(home, msgfile):
    dotq(home, ".qmail", "|true\n")
    r = run(home, msgfile, env={"PATH": 5})  # not a str: subprocess raises TypeError
    assert r.code == 111 and r.text.endswith("(#4.3.0)\n")
