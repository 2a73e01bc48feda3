"""predate, datemail, mailsubj and forward, after qmail's (predate.c, datemail.sh, mailsubj(1), forward(1))."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.client_kit import ME, clean_env, command, header_of, run, write_control

pytest_plugins = ["tests.client_kit"]  # the `smarthost` and `qq` fixtures
pytestmark = pytest.mark.timeout(120)


DATE_RE = rb"Date: \d{1,2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d [+-]\d{4}\n"


@pytest.fixture
def bare_env(tmp_path):
    return clean_env(write_control(tmp_path / "mini", me="mx.example.com"))


# ---------------------------------------------------------------- predate

@pytest.mark.parametrize("tz, zone", [("UTC0", b"+0000"), ("EST5", b"-0500"), ("IST-5:30", b"+0530"),
                                      ("NPT-5:45", b"+0545")])
def test_predate_writes_a_local_date_then_the_input(bare_env, tz, zone):
    p = run(command("predate") + ["cat"], b"Subject: s\n\nbody", {**bare_env, "TZ": tz})
    assert p.returncode == 0, p.stderr
    first, rest = p.stdout.split(b"\n", 1)
    assert re.fullmatch(DATE_RE, first + b"\n") and first.endswith(b" " + zone)
    assert rest == b"Subject: s\n\nbody"


def test_predate_exit_codes(bare_env):
    p = run(command("predate"), b"", bare_env)
    assert p.returncode == 100 and p.stderr == b"predate: usage: predate child\n"
    p = run(command("predate") + ["sh", "-c", "cat > /dev/null; exit 7"], b"x" * 200_000, bare_env)
    assert p.returncode == 7
    p = run(command("predate") + ["sh", "-c", "exit 3"], b"y" * 500_000, bare_env)  # stops reading at once
    assert p.returncode == 3
    p = run(command("predate") + ["no-such-program-here"], b"", bare_env)
    assert p.returncode == 111 and p.stderr.startswith(b"predate: fatal: unable to run no-such-program-here: ")
    p = run(command("predate") + ["sh", "-c", "kill -9 $$"], b"", bare_env)
    assert p.returncode == 111 and p.stderr == b"predate: fatal: child crashed\n"


def test_predate_restores_sigpipe_for_its_child(bare_env):
    # Python ignores SIGPIPE; the child must not inherit that (`yes | head` would never end).
    p = run(command("predate") + ["sh", "-c", "yes | head -1"], b"", bare_env, timeout=30)
    assert p.returncode == 0 and p.stdout.endswith(b"y\n")


def test_predate_starts_small():
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", "import miniqmail.cli.predate"],
                       capture_output=True, text=True, timeout=60)
    loaded = {line.split("|")[-1].strip() for line in p.stderr.splitlines() if "|" in line}
    assert "subprocess" not in loaded and "threading" not in loaded and "miniqmail.handoff" not in loaded


# ---------------------------------------------------------------- datemail

def test_datemail_sends_a_local_zone_date(smarthost):
    p = run(command("datemail") + ["-t"], b"To: example\nSubject: datemail-1\n\nhi\n", smarthost.env(TZ="EST5"))
    assert p.returncode == 0, p.stderr
    [m] = smarthost.messages(b"datemail-1")
    h = header_of(m)
    assert len(h["date"]) == 1 and h["date"][0].endswith(" -0500")
    assert m.endswith(b"Subject: datemail-1\n\nhi\n")


def test_datemail_takes_sendmail_flags(qq, bare_env):
    extra, read = qq
    p = run(command("datemail") + ["-oi", "-f", "me", "--", "a@b.c"], b"Subject: s\n\n", {**bare_env, **extra})
    assert p.returncode == 0, p.stderr
    message, sender, recipients = read()
    assert sender == "me@mx.example.com" and recipients == ["a@b.c"]
    assert re.match(rb"Message-ID: <[^>]+>\nFrom: me@mx.example.com\nCc: recipient list not shown: ;\n"
                    + DATE_RE + b"Subject: s\n\n$", message)
    p = run(command("datemail") + ["-r"], b"", bare_env)
    assert p.returncode == 100 and p.stderr.startswith(b"sendmail: illegal option -- r")


# ---------------------------------------------------------------- mailsubj

def test_mailsubj(smarthost):
    p = run(command("mailsubj") + ["mailsubj-1 report", "example", "example-copy@mx"], b"all well\n",
            smarthost.env(USER="reporter"))
    assert p.returncode == 0, p.stderr
    got = smarthost.messages(b"mailsubj-1", 2)
    h = header_of(got[0])
    assert h["subject"] == ["mailsubj-1 report"]
    assert h["to"] == [f"example@{ME}, example-copy@{ME}"]
    assert h["from"] == [f"reporter@{ME}"]
    assert got[0].endswith(b"\n\nall well\n")


def test_mailsubj_usage_and_no_recipients(bare_env):
    p = run(command("mailsubj"), b"", bare_env)
    assert p.returncode == 100 and p.stderr == b"mailsubj: fatal: usage: mailsubj subject recipient ...\n"
    p = run(command("mailsubj") + ["just a subject"], b"body\n", bare_env)
    assert p.returncode == 100 and p.stderr.startswith(b"qmail-inject: fatal: no recipients")


# ---------------------------------------------------------------- forward

def test_forward(smarthost):
    env = smarthost.env(NEWSENDER="orig@far.test.invalid", DTLINE=f"Delivered-To: list@{ME}\n")
    p = run(command("forward") + [f"example-fwd@{ME}", f"example-fwd2@{ME}"],
            b"Subject: forward-1\n\nbody without a final newline", env)
    assert p.returncode == 0
    assert re.fullmatch(rb"forward: qp \d+\n", p.stderr)
    got = smarthost.messages(b"forward-1", 2)
    h = header_of(got[0])
    assert h["return-path"] == ["<orig@far.test.invalid>"]
    assert f"list@{ME}" in h["delivered-to"]
    assert got[0].endswith(f"Delivered-To: list@{ME}\nSubject: forward-1\n\nbody without a final newline".encode())
    assert b"Message-ID" not in got[0]  # passed on untouched


@pytest.mark.parametrize("drop, wanted", [("NEWSENDER", b"forward: fatal: NEWSENDER not set\n"),
                                          ("DTLINE", b"forward: fatal: DTLINE not set\n")])
def test_forward_needs_its_variables(bare_env, drop, wanted):
    env = {**bare_env, "NEWSENDER": "a@b.c", "DTLINE": "Delivered-To: x@y.z\n"}
    del env[drop]
    p = run(command("forward") + ["a@b.c"], b"x\n", env)
    assert p.returncode == 100 and p.stderr == wanted


def test_forward_exit_codes(bare_env, tmp_path):
    env = {**bare_env, "NEWSENDER": "a@b.c", "DTLINE": "Delivered-To: x@y.z\n"}
    p = run(command("forward"), b"x\n", env)
    assert p.returncode == 100 and p.stderr == b"forward: fatal: usage: forward address ...\n"
    for code, exit_code, text in ((31, 100, b"mail server permanently rejected message (#5.3.0)"),
                                  (71, 111, b"mail server temporarily rejected message (#4.3.0)")):
        script = tmp_path / f"qq{code}"
        script.write_text(f"#!/bin/sh\ncat > /dev/null\nexit {code}\n")
        script.chmod(0o755)
        p = run(command("forward") + ["a@b.c"], b"x\n", {**env, "QMAILQUEUE": str(script)})
        assert p.returncode == exit_code and p.stderr == b"forward: fatal: " + text + b"\n"


def test_forward_passes_addresses_verbatim(qq, bare_env):
    extra, read = qq
    env = {**bare_env, **extra, "NEWSENDER": "", "DTLINE": "Delivered-To: x@y.z\n"}
    p = run(command("forward") + ["unqualified", "Odd Case@Host"], b"m\n", env)
    assert p.returncode == 0, p.stderr
    message, sender, recipients = read()
    assert (message, sender, recipients) == (b"Delivered-To: x@y.z\nm\n", "", ["unqualified", "Odd Case@Host"])
