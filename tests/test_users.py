"""users/assign and users/cdb after qmail-users(5), qmail-newu and qmail-lspawn; qmail-getpw."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smarthost import cdb
from smarthost.errors import TemporaryError
from smarthost.users import (
    AssignError,
    UserEntry,
    UsersError,
    compile_assign,
    getpw,
    lookup,
    parse_assign,
    resolve,
)

ASSIGN = b"""\
=joe:joe:1001:100:/home/joe:::
+joe-:joe:1001:100:/home/joe:-::
+Lists-:lists:1002:100:/home/lists:-:list-:
+lists-big-:big:1003:100:/home/big:-::
=Dup:first:1004:100:/home/first:::
=dup:second:1005:100:/home/second:::
+:catch:1006:100:/home/catch:-::
.
"""


def make_users(root, assign: bytes = ASSIGN) -> str:
    (root / "users").mkdir(exist_ok=True)
    (root / "users" / "assign").write_bytes(assign)
    compile_assign(str(root / "users" / "assign"), str(root / "users" / "cdb"))
    return str(root / "users" / "cdb")


def test_parse_assign() -> None:
    entries = parse_assign(ASSIGN)
    assert [(e.lineno, e.prefix, e.local) for e in entries[:3]] == [
        (1, False, b"joe"),
        (2, True, b"joe-"),
        (3, True, b"Lists-"),
    ]
    assert entries[2].fields == (b"lists", b"1002", b"100", b"/home/lists", b"-", b"list-")
    assert entries[0].key == b"!joe\0" and entries[2].key == b"!lists-"
    assert entries[0].data == b"joe\x001001\x00100\x00/home/joe\x00\x00"


def test_anything_after_the_sixth_field_and_the_dot_is_ignored() -> None:
    (e,) = parse_assign(b"=a:u:1:2:/h:-:x:trailing:junk\r\n.\ngarbage without colons\n")
    assert e.fields == (b"u", b"1", b"2", b"/h", b"-", b"x")


@pytest.mark.parametrize(
    "data, lineno, reason",
    [
        (b"=joe:joe:1:2:/h::\n.\n", 1, "colons"),
        (b"=ok:u:1:2:/h:::\n=joe:joe:x:2:/h:::\n.\n", 2, "numbers"),
        (b"=joe:joe:1::/h:::\n.\n", 1, "numbers"),
        (b"=jo\0e:joe:1:2:/h:::\n.\n", 1, "NUL"),
        (b"=joe:joe:1:2:/h:::\n", 2, "missing final"),
        (b"", 1, "missing final"),
        (b"=joe:joe:1:2:/h:::", 1, "incomplete"),
        (b"joe:joe:1:2:/h:::\n.\n", 1, "'='"),
        (b"\n.\n", 1, "'='"),
    ],
)
def test_bad_assign(data: bytes, lineno: int, reason: str) -> None:
    with pytest.raises(AssignError) as info:
        parse_assign(data)
    assert info.value.lineno == lineno
    assert reason in str(info.value)
    assert isinstance(info.value, UsersError) and isinstance(info.value, TemporaryError)


@settings(deadline=None, max_examples=200)
@given(st.binary(max_size=200))
def test_any_assign_bytes_parse_or_assignerror(data: bytes) -> None:
    try:
        parse_assign(data)
    except AssignError:
        pass


def test_cdb_records_are_qmail_newus(tmp_path) -> None:
    path = make_users(tmp_path)
    with cdb.Reader(path) as r:
        items = list(r.items())
    assert items[0] == (b"!joe\0", b"joe\x001001\x00100\x00/home/joe\x00\x00")
    assert items[2] == (b"!lists-", b"lists\x001002\x00100\x00/home/lists\x00-\x00list-")
    assert items[4][0] == b"!dup\0" and items[5][0] == b"!dup\0"
    assert items[6][0] == b"!"
    # The last characters of the non-empty prefix keys, each once; `+:` adds none.
    assert items[-1] == (b"", b"-")
    assert len(items) == 8


def test_exact_match(tmp_path) -> None:
    path = make_users(tmp_path)
    assert lookup(path, "joe") == UserEntry("joe", 1001, 100, "/home/joe", "", "")
    assert lookup(path, "JoE") == UserEntry("joe", 1001, 100, "/home/joe", "", "")


def test_prefix_match_keeps_the_rest_in_original_case(tmp_path) -> None:
    path = make_users(tmp_path)
    assert lookup(path, "joe-Foo") == UserEntry("joe", 1001, 100, "/home/joe", "-", "Foo")
    assert lookup(path, "LISTS-Weekly-News") == UserEntry(
        "lists", 1002, 100, "/home/lists", "-", "list-Weekly-News"
    )


def test_longest_prefix_wins(tmp_path) -> None:
    path = make_users(tmp_path)
    assert lookup(path, "lists-big-X").user == "big"
    assert lookup(path, "lists-big-X").ext == "X"
    assert lookup(path, "lists-bigX").user == "lists"
    assert lookup(path, "lists-").ext == "list-"


def test_first_line_wins_for_duplicates(tmp_path) -> None:
    path = make_users(tmp_path)
    assert lookup(path, "dup").user == "first"
    assert lookup(path, "DUP").uid == 1004


def test_catch_all_prefix_and_no_match(tmp_path) -> None:
    path = make_users(tmp_path)
    assert lookup(path, "Nobody-Here") == UserEntry("catch", 1006, 100, "/home/catch", "-", "Nobody-Here")
    path = make_users(tmp_path, b"=joe:joe:1:2:/h:::\n+ab:x:3:4:/x:-::\n.\n")
    assert lookup(path, "nobody") is None
    assert lookup(path, "joex") is None  # `=` is exact only
    assert lookup(path, "abc").ext == "c"


def test_only_prefixes_ending_in_a_wildcard_character_are_probed(tmp_path) -> None:
    # A `!ab` record the "" set does not announce (b is not in it) is never probed,
    # exactly as qmail-lspawn skips it.
    path = str(tmp_path / "cdb")
    cdb.write(path, [(b"!ab", b"x\x003\x004\x00/x\x00-\x00"), (b"", b"-")])
    assert lookup(path, "abc") is None


def test_missing_cdb_is_no_match(tmp_path) -> None:
    assert lookup(str(tmp_path / "users" / "cdb"), "joe") is None


@pytest.mark.parametrize(
    "content",
    [b"", b"not a cdb", b"\xff" * 4096],
)
def test_corrupt_cdb_defers(tmp_path, content: bytes) -> None:
    path = tmp_path / "cdb"
    path.write_bytes(content)
    with pytest.raises(UsersError):
        lookup(str(path), "joe")


def test_cdb_without_wildcard_key_or_with_bad_entries_defers(tmp_path) -> None:
    path = str(tmp_path / "cdb")
    cdb.write(path, [(b"!joe\0", b"joe\x001\x002\x00/h\x00\x00")])
    with pytest.raises(UsersError):
        lookup(path, "joe")
    cdb.write(path, [(b"!joe\0", b"joe\x00one\x002\x00/h\x00\x00"), (b"", b"")])
    with pytest.raises(UsersError):
        lookup(path, "joe")


def test_unreadable_cdb_defers(tmp_path) -> None:
    (tmp_path / "cdb").mkdir()
    with pytest.raises(UsersError):
        lookup(str(tmp_path / "cdb"), "joe")


def test_resolve_user_mode(tmp_path) -> None:
    (tmp_path / "alias").mkdir()
    make_users(tmp_path)
    assert resolve(str(tmp_path), "joe-x", system_mode=False).ext == "x"
    make_users(tmp_path, b"=joe:joe:1:2:/h:::\n.\n")
    alias = resolve(str(tmp_path), "Postmaster", system_mode=False)
    assert alias == UserEntry("alias", os.getuid(), os.getgid(), str(tmp_path / "alias"), "-", "Postmaster")


def test_resolve_without_users_cdb_or_alias(tmp_path) -> None:
    with pytest.raises(UsersError):
        resolve(str(tmp_path), "anyone", system_mode=False)
    (tmp_path / "alias").mkdir()
    assert resolve(str(tmp_path), "anyone", system_mode=False).user == "alias"


def test_resolve_system_mode_alias_is_owner_of_alias_dir(tmp_path) -> None:
    (tmp_path / "alias").mkdir()
    st_ = os.stat(tmp_path / "alias")
    entry = resolve(str(tmp_path), "no-such-account-here", system_mode=True)
    assert (entry.user, entry.uid, entry.gid) == ("alias", st_.st_uid, st_.st_gid)
    assert (entry.dash, entry.ext) == ("-", "no-such-account-here")


def _mail_account() -> pwd.struct_passwd | None:
    """An account qmail-getpw would deliver to: uid not 0, home present and owned by it."""
    for pw in pwd.getpwall():
        if pw.pw_uid == 0 or len(pw.pw_name) >= 31 or "-" in pw.pw_name or pw.pw_name != pw.pw_name.lower():
            continue
        try:
            if os.stat(pw.pw_dir).st_uid == pw.pw_uid:
                return pw
        except OSError:
            continue
    return None


def test_getpw_refuses_root_and_unknown_names() -> None:
    assert getpw("root") is None
    assert getpw("root-anything") is None
    assert getpw("no-such-account-here") is None
    assert getpw("") is None


@pytest.mark.skipif(_mail_account() is None, reason="no account with its own home directory")
def test_getpw_exact_and_extension() -> None:
    pw = _mail_account()
    assert pw is not None
    name = pw.pw_name
    assert getpw(name) == UserEntry(name, pw.pw_uid, pw.pw_gid, pw.pw_dir, "", "")
    assert getpw(name.upper() + "-Foo-Bar") == UserEntry(name, pw.pw_uid, pw.pw_gid, pw.pw_dir, "-", "Foo-Bar")
    assert getpw(name + "x" * 40) is None


def newu(root) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SMARTHOST_ROOT=str(root))
    return subprocess.run(
        [sys.executable, "-m", "smarthost.cli.qmail_newu"], env=env, capture_output=True, text=True, timeout=60
    )


def test_qmail_newu_program(tmp_path) -> None:
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "assign").write_bytes(ASSIGN)
    done = newu(tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert sorted(os.listdir(tmp_path / "users")) == ["assign", "cdb"]
    assert lookup(str(tmp_path / "users" / "cdb"), "joe-Bar").ext == "Bar"
    before = (tmp_path / "users" / "cdb").read_bytes()

    (tmp_path / "users" / "assign").write_bytes(b"=joe:joe:1001:100:/home/joe:::\n=bad:bad:1:2\n.\n")
    done = newu(tmp_path)
    assert done.returncode == 111
    assert done.stderr.startswith("qmail-newu: fatal: ") and "line 2" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert (tmp_path / "users" / "cdb").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "users")) == ["assign", "cdb"]


def test_qmail_newu_without_assign(tmp_path) -> None:
    (tmp_path / "users").mkdir()
    done = newu(tmp_path)
    assert done.returncode == 111
    assert done.stderr == "qmail-newu: fatal: unable to open users/assign: file does not exist\n"
