"""sendmail: qmail's flag translation, what real callers send, `-bs` dialogues, a real MUA, start-up imports."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from miniqmail.smtp_stdio import DataError, DataReader, Session, parse_path

from tests.client_kit import ME, OneByte, clean_env, command, header_of, run, write_control

pytest_plugins = ["tests.client_kit"]  # the `smarthost` and `qq` fixtures
pytestmark = pytest.mark.timeout(120)


SENDMAIL = command("sendmail")


def delivered_to(messages: list[bytes]) -> list[str]:
    return sorted(re.search(rb"^Delivered-To: (.*)$", m, re.M).group(1).decode() for m in messages)


# ---------------------------------------------------------------- real callers

def test_cron(smarthost):
    p = run(SENDMAIL + ["-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t", "-f", "root"],
            b"To: example\nSubject: cron-1\nContent-Type: text/plain; charset=UTF-8\n\n/bin/true said nothing\n",
            smarthost.env(USER="root", NAME="Root User"))
    assert p.returncode == 0 and p.stderr == b""
    [m] = smarthost.messages(b"cron-1")
    h = header_of(m)
    assert h["return-path"] == [f"<root@{ME}>"]
    assert h["from"] == [f'"CronDaemon" <root@{ME}>']
    assert m.endswith(b"\n\n/bin/true said nothing\n")


def test_php_mail_with_crlf_headers(smarthost):
    message = (b"To: example@mx.test.invalid\r\nSubject: php-1\r\nX-PHP-Originating-Script: 33:form.php\r\n"
               b"MIME-Version: 1.0\r\nFrom: web@shop.test.invalid\r\n\r\nline one\r\nline two\r\n")
    p = run(SENDMAIL + ["-t", "-i"], message, smarthost.env(USER="www-data"))
    assert p.returncode == 0, p.stderr
    [m] = smarthost.messages(b"php-1")
    assert b"\r" not in m
    assert b"\nX-PHP-Originating-Script: 33:form.php\nMIME-Version: 1.0\nFrom: web@shop.test.invalid\n\nline one\nline two\n" in m
    assert header_of(m)["return-path"] == [f"<www-data@{ME}>"]


def test_git_send_email(smarthost):
    message = (b"From: Dev Eloper <dev@work.test.invalid>\nTo: example@mx.test.invalid\n"
               b"Cc: example-list@mx.test.invalid\nSubject: [PATCH] git-1\nDate: Fri, 20 Nov 2026 10:00:00 +0100\n"
               b"Message-Id: <20261120090000.1-1-dev@work.test.invalid>\nX-Mailer: git-send-email 2.39.2\n"
               b"MIME-Version: 1.0\nContent-Transfer-Encoding: 8bit\n\n---\n diff\n")
    p = run(SENDMAIL + ["-i", f"example@{ME}", f"example-list@{ME}"], message, smarthost.env(USER="dev"))
    assert p.returncode == 0, p.stderr
    got = smarthost.messages(b"git-1", 2)
    assert delivered_to(got) == [f"example-list@{ME}", f"example@{ME}"]
    h = header_of(got[0])
    assert h["date"] == ["Fri, 20 Nov 2026 10:00:00 +0100"]
    assert h["message-id"] == ["<20261120090000.1-1-dev@work.test.invalid>"]
    assert h["from"] == ["Dev Eloper <dev@work.test.invalid>"]


def test_mutt(smarthost):
    message = b"From: me@ws.test.invalid\nTo: someone@far.test.invalid\nBcc: example\nSubject: mutt-1\n\nhi\n"
    p = run(SENDMAIL + ["-oem", "-oi", "--", f"example-mutt@{ME}"], message, smarthost.env())
    assert p.returncode == 0, p.stderr
    [m] = smarthost.messages(b"mutt-1")
    assert delivered_to([m]) == [f"example-mutt@{ME}"]  # arguments only: To and Bcc are not used
    assert b"Bcc" not in m


def test_logwatch(smarthost):
    p = run(SENDMAIL + ["-t", "-oi"], b"To: example\nFrom: logwatch@ws\nSubject: logwatch-1\n\nreport\n",
            smarthost.env())
    assert p.returncode == 0, p.stderr
    [m] = smarthost.messages(b"logwatch-1")
    assert header_of(m)["from"] == ["logwatch@ws.test.invalid"]


def test_t_also_takes_the_arguments(smarthost):
    p = run(SENDMAIL + ["-t", "example-arg"], b"To: example\nSubject: both-1\n\n", smarthost.env())
    assert p.returncode == 0, p.stderr
    assert delivered_to(smarthost.messages(b"both-1", 2)) == [f"example-arg@{ME}", f"example@{ME}"]


# ---------------------------------------------------------------- flags

@pytest.mark.parametrize("flags", [
    ["-v", "-x", "-m", "-i"], ["-B8BITMIME", "-e", "m", "-p", "smtp:host"], ["-B", "7BIT", "-oee", "-o", "i"],
    ["-Eignored", "-Jalso", "-bm"], ["-odb", "-oQ/tmp", "-vvv"],
])
def test_ignored_flags(qq, example_root_env, flags):
    extra, read = qq
    p = run(SENDMAIL + flags + ["a@b.c"], b"Subject: s\n\n", {**example_root_env, **extra})
    assert p.returncode == 0, p.stderr
    assert read()[2] == ["a@b.c"]


@pytest.fixture
def example_root_env(tmp_path):
    root = write_control(tmp_path / "mini", me="mx.example.com", defaultdomain="example.com",
                         plusdomain="example.com")
    return clean_env(root, USER="u")


def test_f_sets_from_and_keeps_an_f_name(qq, example_root_env):
    extra, read = qq
    env = {**example_root_env, **extra, "NAME": "Inherited", "QMAILHOST": "old.example"}
    run(SENDMAIL + ["-f", "bounce@lists.example.org", "a@b.c"], b"Subject: s\n\n", env)
    message, sender, _ = read()
    assert sender == "bounce@lists.example.org"
    assert b"\nFrom: bounce@lists.example.org\n" in message
    run(SENDMAIL + ["-F", "Named", "-fbounce", "a@b.c"], b"Subject: s\n\n", env)
    message, sender, _ = read()
    assert sender == "bounce@mx.example.com"
    assert b'\nFrom: "Named" <bounce@mx.example.com>\n' in message
    run(SENDMAIL + ["-f", "<>", "-t"], b"To: a@b.c\n\n", env)
    message, sender, _ = read()
    assert sender == "" and b'\nFrom: "Inherited" <u@old.example>\n' in message


@pytest.mark.parametrize("flags, text", [
    (["-r", "x"], "illegal option -- r"), (["-N", "never"], "illegal option -- N"),
    (["-q"], "illegal option -- q"), (["-I"], "illegal option -- I"), (["-bi"], "-bi is not supported"),
    (["-bv"], "-bv is not supported"), (["-bd"], "-bd is not supported"), (["-bt"], "-bt is not supported"),
    (["-i", "-f"], "option requires an argument -- f"),
])
def test_unsupported_flags(example_root_env, flags, text):
    p = run(SENDMAIL + flags + (["a@b.c"] if flags[-1] != "-f" else []), b"Subject: s\n\n", example_root_env)
    assert p.returncode == 100 and p.stdout == b""
    assert p.stderr.decode() == f"sendmail: {text}; usage: sendmail [ -t ] [ -fsender ] [ -Fname ] [ -bp ] [ -bs ] [ arg ... ]\n"


def _as(name: str, args: list[str], env) -> subprocess.CompletedProcess:
    code = f"import sys; sys.argv[0] = {name!r}; from miniqmail.cli.sendmail import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, env=env, timeout=30)


def test_bp_and_mailq_say_there_is_no_queue(example_root_env):
    p = run(SENDMAIL + ["-bp"], b"", example_root_env)
    assert p.returncode == 0 and p.stdout.count(b"\n") == 1 and b"keeps no mail queue" in p.stdout
    p = _as("/usr/bin/mailq", [], example_root_env)
    assert p.returncode == 0 and b"keeps no mail queue" in p.stdout
    p = _as("newaliases", [], example_root_env)
    assert p.returncode == 100 and p.stderr == b"sendmail: fatal: please use fastforward/newaliases instead\n"


def test_no_recipients_is_refused_cleanly(example_root_env):
    p = run(SENDMAIL + ["-i"], b"To: a@b.c\n\nhello\n", example_root_env)
    assert p.returncode == 100
    assert p.stderr.decode().startswith("qmail-inject: fatal: no recipients") and p.stderr.count(b"\n") == 1


# ---------------------------------------------------------------- -bs

def smtp(env, script: bytes) -> subprocess.CompletedProcess:
    return run(SENDMAIL + ["-bs"], script, env)


def replies(p: subprocess.CompletedProcess) -> list[str]:
    return p.stdout.decode().split("\r\n")[:-1]


def test_bs_dialogue_delivers(smarthost):
    script = (b"EHLO client.test.invalid\r\nMAIL FROM:<bs@far.test.invalid> BODY=8BITMIME\r\n"
              b"RCPT TO:<example@mx.test.invalid>\r\nRCPT TO:<@relay.test.invalid:example-route@mx.test.invalid>\r\n"
              b"DATA\r\nSubject: bs-1\r\n\r\n..leading dot\r\n.\r\n"
              b"QUIT\r\n")
    p = smtp(smarthost.env(), script)
    assert p.returncode == 0, p.stderr
    r = replies(p)
    assert r[0] == "220 ws.test.invalid ESMTP"
    assert r[1:4] == ["250-ws.test.invalid", "250-PIPELINING", "250 8BITMIME"]
    assert r[4:9] == ["250 ok"] * 3 + ["354 go ahead"] + [r[8]]
    assert re.fullmatch(r"250 ok \d+ qp \d+", r[8])
    assert r[9] == "221 ws.test.invalid"
    got = smarthost.messages(b"bs-1", 2)
    assert delivered_to(got) == [f"example-route@{ME}", f"example@{ME}"]
    m = got[0]
    assert b"\r" not in m and m.endswith(b"Subject: bs-1\n\n.leading dot\n")
    assert re.search(rb"^Received: from localhost \(HELO client\.test\.invalid\) \(sendmail-bs@127\.0\.0\.1\)\n"
                     rb"  by localhost with SMTP; \d+ \w{3} \d{4} [\d:]{8} -0000\n", m, re.M)
    assert header_of(m)["return-path"] == ["<bs@far.test.invalid>"]
    assert b"Message-ID" not in m  # -bs passes the message on as it is, like qmail-smtpd


def test_bs_sequence_and_syntax_errors(example_root_env):
    script = (b"RCPT TO:<a@b.c>\r\nDATA\r\nHELO\r\nHELO me\r\nMAIL TO:<x>\r\nMAIL FROM:<a@b.c\r\n"
              b"MAIL FROM:<a@b.c>\r\nMAIL FROM:<d@e.f>\r\nDATA\r\nRCPT TO:<>\r\nRCPT TO:bare@b.c\r\n"
              b"RSET\r\nDATA\r\nNOOP\r\nVRFY x\r\nFOO\r\n" + b"X" * 2000 + b"\r\nQUIT\r\n")
    p = smtp(example_root_env, script)
    assert p.returncode == 0
    assert replies(p) == [
        "220 mx.example.com ESMTP", "503 MAIL first (#5.5.1)", "503 MAIL first (#5.5.1)",
        "501 syntax error: give your host name (#5.5.4)", "250 mx.example.com", "555 syntax error (#5.5.4)",
        "555 syntax error (#5.5.4)", "250 ok", "503 nested MAIL command (#5.5.1)", "503 RCPT first (#5.5.1)",
        "553 sorry, <> is no recipient (#5.1.1)", "250 ok", "250 flushed", "503 MAIL first (#5.5.1)", "250 ok",
        "252 send some mail, i'll try my best", "502 unimplemented (#5.5.1)", "500 line too long (#5.5.2)",
        "221 mx.example.com"]


def _queue_exiting(tmp_path: Path, code: int) -> str:
    script = tmp_path / f"qq{code}"
    script.write_text(f"#!/bin/sh\ncat > /dev/null\nexit {code}\n")
    script.chmod(0o755)
    return str(script)


def test_bs_answers_the_hand_off(example_root_env, tmp_path):
    data = b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<a@b.c>\r\nDATA\r\nSubject: s\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    for code, wanted in ((31, "554 mail server permanently rejected message (#5.3.0)"),
                         (71, "451 mail server temporarily rejected message (#4.3.0)")):
        p = smtp({**example_root_env, "QMAILQUEUE": _queue_exiting(tmp_path, code)}, data)
        assert replies(p)[-2:] == [wanted, "221 mx.example.com"]


def test_bs_bare_lf_and_eof_send_nothing(smarthost):
    p = smtp(smarthost.env(), b"HELO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<example@mx.test.invalid>\r\n"
             b"DATA\r\nSubject: bs-bare\r\n\r\nsmuggled\n.\nMAIL FROM:<x@y.z>\r\n")
    assert p.returncode == 1
    assert replies(p)[-1] == "451 See https://cr.yp.to/docs/smtplf.html."
    p = smtp(smarthost.env(), b"HELO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<example@mx.test.invalid>\r\n"
             b"DATA\r\nSubject: bs-eof\r\n\r\ncut short")
    assert p.returncode == 1 and replies(p)[-1] == "354 go ahead"
    assert smarthost.absent(b"bs-bare") and smarthost.absent(b"bs-eof", wait=0)


def test_bs_interactive(smarthost):
    proc = subprocess.Popen(SENDMAIL + ["-bs"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=smarthost.env())
    try:
        def say(line: bytes) -> bytes:
            proc.stdin.write(line + b"\r\n")
            proc.stdin.flush()
            return proc.stdout.readline()

        assert proc.stdout.readline().startswith(b"220 ")
        assert say(b"helo localhost") == b"250 ws.test.invalid\r\n"
        assert say(b"mail from:<i@far.test.invalid>") == b"250 ok\r\n"
        assert say(b"rcpt to:<example@mx.test.invalid>") == b"250 ok\r\n"
        assert say(b"data") == b"354 go ahead\r\n"
        proc.stdin.write(b"Subject: bs-2\r\n\r\n")
        assert say(b".").startswith(b"250 ok ")
        assert say(b"quit") == b"221 ws.test.invalid\r\n"
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
    [m] = smarthost.messages(b"bs-2")
    assert b"(HELO" not in m  # HELO localhost is the name the client already has


def _stuffed(lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


LINE = st.binary(max_size=30).map(lambda b: b.replace(b"\n", b""))


@hsettings(max_examples=200, deadline=None)
@given(st.lists(LINE, max_size=12), st.integers(min_value=3, max_value=40), st.binary(max_size=10))
def test_data_reader_decodes_and_leaves_the_rest(lines, piece, trailing):
    stream = io.BufferedReader(io.BytesIO(_stuffed(lines) + trailing), buffer_size=max(piece, 8))
    reader = DataReader(stream, piece=piece)  # type: ignore[arg-type]
    assert reader.read() == b"".join(line + b"\n" for line in lines)
    assert stream.read() == trailing


def test_data_reader_one_byte_at_a_time():
    data = _stuffed([b"Subject: x", b"", b"..two", b".", b"a\rb"]) + b"QUIT\r\n"
    stream = io.BufferedReader(OneByte(data), buffer_size=1)
    assert DataReader(stream, piece=3).read() == b"Subject: x\n\n..two\n.\na\rb\n"  # type: ignore[arg-type]
    assert stream.read() == b"QUIT\r\n"


@hsettings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=2, max_value=64))
def test_data_reader_total(data, piece):
    reader = DataReader(io.BufferedReader(io.BytesIO(data)), piece=piece)  # type: ignore[arg-type]
    try:
        reader.read()
    except DataError:
        with pytest.raises(DataError):
            reader.read(1)  # once broken, it stays broken


@hsettings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=255), max_size=60))
def test_smtp_commands_total(text):
    session = Session("mx.test.invalid")
    reply = session.command(text.encode("latin-1") + b"\r\n")
    assert re.fullmatch(r"[2-5]\d\d[ -].*", reply.text, re.S)
    address = parse_path(text, "FROM")
    assert address is None or (len(address) <= 900 and "\n" not in address)


# ---------------------------------------------------------------- a real MUA, and start-up cost

S_NAIL = "/usr/bin/s-nail"


def test_s_nail_sends_through_our_sendmail(smarthost, tmp_path):
    if not os.path.exists(S_NAIL):
        pytest.skip("s-nail is not installed (apt-get install -y s-nail)")
    mta = Path(SENDMAIL[0]) if len(SENDMAIL) == 1 else tmp_path / "sendmail"
    if len(SENDMAIL) > 1:
        mta.write_text("#!/bin/sh\nexec " + " ".join(SENDMAIL) + ' "$@"\n')
        mta.chmod(0o755)
    env = smarthost.env(HOME=str(tmp_path), MAILRC="/dev/null", USER="mua", LC_ALL="C.UTF-8")
    p = subprocess.run([S_NAIL, "-Sv15-compat", f"-Smta={mta}", "-Ssendwait", "-Snodead", "-Snosave",
                        "-s", "snail-1 greetings", f"example@{ME}"], input=b"sent by s-nail\n",
                       capture_output=True, env=env, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    [m] = smarthost.messages(b"snail-1")
    h = header_of(m)
    assert h["subject"] == ["snail-1 greetings"] and h["to"] == [f"example@{ME}"]
    # s-nail sets USER and LOGNAME itself, from the password file
    assert re.fullmatch(rf"<[^@]+@{ME}>", h["return-path"][0]) and "date" in h and "message-id" in h
    assert m.endswith(b"\n\nsent by s-nail\n")


@pytest.mark.parametrize("module", ["miniqmail.cli.sendmail", "miniqmail.cli.qmail_inject"])
def test_start_up_imports_stay_small(module):
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    loaded = {line.split("|")[-1].strip() for line in p.stderr.splitlines() if "|" in line}
    heavy = {"click", "dns", "email", "asyncio", "subprocess", "threading"}
    assert not {m for m in loaded if m.split(".")[0] in heavy}
