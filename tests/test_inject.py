"""qmail-inject: address rewriting, header handling and recipients, by qmail-inject(8) and qmail-header(5).

Exact `-n` output runs the injector in this process (fast, many cases);
end-to-end tests run the program and send through a real smart host's QMQP
listener into a Maildir. The envelope-order tests use $QMAILQUEUE with a
small shell script that keeps what it was given.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from miniqmail import address, headers
from miniqmail.address import AddressError, Qualifier
from miniqmail.inject import Options, inject
from tests.client_kit import ME, OneByte, clean_env, command, header_of, run, write_control

pytest_plugins = ["tests.client_kit"]  # the `smarthost` and `qq` fixtures
pytestmark = pytest.mark.timeout(120)
DATE = b"Date: 1 Jan 2026 00:00:00 -0000\n"
MSGID = b"Message-ID: <fixed@test>\n"


# ---------------------------------------------------------------- §7.4: qualification, every row

@pytest.fixture
def example_root(tmp_path):
    return write_control(tmp_path / "mini", me="mx.example.com", defaultdomain="example.com",
                         plusdomain="plus.example.org")


TABLE = [
    ("user", "user@mx.example.com"),
    ("user@host", "user@host.example.com"),
    ("user@host.", "user@host.example.com"),
    ("eric@mammoth.cs+", "eric@mammoth.cs.plus.example.org"),
    ("x@", "x@mx.example.com"),
    ("u@h.dom.", "u@h.dom"),
    ("u@[1.2.3.4]", "u@[1.2.3.4]"),
]


@pytest.mark.parametrize("given_, wanted", TABLE + [
    ("user.", "user.@mx.example.com"), ("first last@x", "first last@x.example.com"), ("x@[]", "x@[]"),
])
def test_argument_qualification(given_, wanted):
    q = Qualifier("mx.example.com", "example.com", "plus.example.org")
    assert q.qualify(given_) == wanted


def inject_n(root: Path, data: bytes, *args: str, env: dict[str, str] | None = None, **opts) -> tuple[int, bytes]:
    """qmail-inject -n in this process: exit code and output."""
    out = io.BytesIO()
    options = Options(queue=False, args=tuple(args), **opts)
    env = {"QMAILUSER": "u"} if env is None else env
    code = inject(io.BufferedReader(io.BytesIO(data)), out, options, env, str(root))
    return code, out.getvalue()


def test_header_qualification_every_row(example_root):
    fields = b"".join(b"To: " + g.encode() + b"\n" for g, _ in TABLE)
    code, out = inject_n(example_root, DATE + MSGID + b"From: me@x.y\n" + fields + b"\nbody\n")
    assert code == 0
    assert out == (b"Return-Path: <u@mx.example.com>\n" + DATE + MSGID + b"From: me@x.y\n"
                   + b"".join(b"To: " + w.encode() + b"\n" for _, w in TABLE) + b"\nbody\n")


def test_source_route_and_literals_in_headers(example_root):
    code, out = inject_n(example_root, DATE + MSGID + b"From: <@a,@b:joe@far.example.org>\n"
                         b"To: <x@[]>, <u@[10.0.0.1]>, <>\n\n")
    assert code == 0
    assert b"From: <joe@far.example.org>\n" in out
    assert b"To: <x@[]>, <u@[10.0.0.1]>, <>\n" in out


def test_environment_overrides_control_files(example_root):
    env = {"QMAILUSER": "u", "QMAILDEFAULTHOST": "dh.example.net", "QMAILDEFAULTDOMAIN": "dd.example.net",
           "QMAILPLUSDOMAIN": "pd.example.net", "QMAILIDHOST": "id.example.net"}
    code, out = inject_n(example_root, b"To: a, b@c, d@e+\n\n", env=env)
    assert code == 0
    assert b"To: a@dh.example.net, b@c.dd.example.net, d@e.pd.example.net\n" in out
    assert re.search(rb"^Message-ID: <\d{14}\.\d+\.qmail@id\.example\.net>$", out, re.M)


def test_control_defaults_fall_back_to_me_then_literal(tmp_path):
    bare = tmp_path / "bare"
    (bare / "control").mkdir(parents=True)
    code, out = inject_n(bare, b"To: a, b@c\n\n")
    assert code == 0 and b"To: a@defaulthost.defaultdomain, b@c.defaultdomain\n" in out
    write_control(bare, me="me.example")
    code, out = inject_n(bare, b"To: a, b@c\n\n")
    assert b"To: a@me.example, b@c.me.example\n" in out
    assert re.search(rb"^Message-ID: <\d{14}\.\d+\.qmail@me\.example>$", out, re.M)


# ---------------------------------------------------------------- §7.5: exact -n output for tricky headers

EXACT = [
    # name, input after Date/Message-ID/From, expected output after them
    ("continuation lines join, folding is redone",
     b"To: a,\n  b,\n\tc\n", b"To: a@mx.example.com, b@mx.example.com, c@mx.example.com\n"),
    ("long lists fold at 80 columns",
     b"Cc: " + b", ".join(b"user%d@example.com" % i for i in range(9)) + b"\n",
     b"Cc: user0@example.com, user1@example.com, user2@example.com,\n"
     b"  user3@example.com, user4@example.com, user5@example.com, user6@example.com,\n"
     b"  user7@example.com, user8@example.com\n"),
    ("groups, phrases, comments and quoted commas",
     b'To: Team: "Doe, J" <j@d>, k (kay);, Joe Smith <joe@x>\n',
     b'To: Team: "Doe, J" <j@d.example.com>, k@mx.example.com (kay);,\n  Joe Smith <joe@x.example.com>\n'),
    ("a bare list of words is a list of addresses", b"To: a b\n",
     b"To: a@mx.example.com, b@mx.example.com\n"),
    ("the name is case-blind and blanks may precede the colon", b"tO \t: a\n", b"tO: a@mx.example.com\n"),
    ("8-bit bytes pass through; in an address phrase they get quotes",
     b"To: a@b.c\nSubject: gr\xfc\xdfe \xe2\x82\xac\nReply-To: J\xc3\xb6rg <j@x.y>\n",
     b"To: a@b.c\nSubject: gr\xfc\xdfe \xe2\x82\xac\nReply-To: \"J\xc3\xb6rg\" <j@x.y>\n"),
    ("an mbox From_ line becomes MBOX-Line", b"From joe Thu Jan  1 00:00:00 2026\nTo: a@b.c\n",
     b"MBOX-Line: From joe Thu Jan  1 00:00:00 2026\nTo: a@b.c\n"),
    ("Bcc and Content-Length are dropped",
     b"To: a@b.c\nBcc: x\nContent-Length: 99\nX-Keep: yes\n",
     b"To: a@b.c\nX-Keep: yes\n"),
    ("unknown fields are left alone", b"To: a@b.c\nX-Odd:  ( unbalanced \"\n", b"To: a@b.c\nX-Odd:  ( unbalanced \"\n"),
    ("CR before LF is kept by qmail-inject itself", b"To: a@b.c\r\nX-Y: z\r\n",
     b"To: a@b.c\nX-Y: z\r\n"),
]


@pytest.mark.parametrize("name, given_, wanted", EXACT, ids=[e[0] for e in EXACT])
def test_exact_output(example_root, name, given_, wanted):
    head = DATE + MSGID + b"From: f@g.h\n"
    code, out = inject_n(example_root, head + given_ + b"\nbody\n")
    assert code == 0
    assert out == b"Return-Path: <u@mx.example.com>\n" + head + wanted + b"\nbody\n"


def test_header_ends_at_the_first_line_that_is_no_field(example_root):
    code, out = inject_n(example_root, DATE + MSGID + b"From: f@g.h\nTo: a@b.c\nnot a field\nmore\n")
    assert out.endswith(b"To: a@b.c\n\nnot a field\nmore\n")
    code, out = inject_n(example_root, DATE + MSGID + b"From: f@g.h\nTo: a@b.c\nbad name: x\n")
    assert out.endswith(b"To: a@b.c\n\nbad name: x\n")


def test_no_blank_line_and_no_final_newline(example_root):
    code, out = inject_n(example_root, DATE + MSGID + b"From: f@g.h\nSubject: s")
    assert code == 0 and out == (b"Return-Path: <u@mx.example.com>\nCc: recipient list not shown: ;\n"
                                 + DATE + MSGID + b"From: f@g.h\nSubject: s\n")
    code, out = inject_n(example_root, DATE + MSGID + b"From: f@g.h\nTo: a@b.c\n\nlast line")
    assert out.endswith(b"\n\nlast line\n")
    code, out = inject_n(example_root, b"")
    assert code == 0 and out.startswith(b"Return-Path: <u@mx.example.com>\nDate: ")


def test_new_fields_go_above_and_have_qmail_formats(example_root):
    env = {"QMAILUSER": "joe", "QMAILNAME": "Joe Q. Public"}
    code, out = inject_n(example_root, b"Subject: s\n\nbody\n", env=env)
    lines = out.decode().split("\n")
    assert lines[0] == "Return-Path: <joe@mx.example.com>"
    assert re.fullmatch(r"Date: \d{1,2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} "
                        r"\d\d:\d\d:\d\d -0000", lines[1])
    assert re.fullmatch(rf"Message-ID: <\d{{14}}\.{os.getpid()}\.qmail@mx\.example\.com>", lines[2])
    assert lines[3] == 'From: "Joe Q. Public" <joe@mx.example.com>'
    assert lines[4:7] == ["Cc: recipient list not shown: ;", "Subject: s", ""]


@pytest.mark.parametrize("env, wanted", [
    ({"QMAILUSER": "joe", "QMAILNAME": "Joe Q. Public", "QMAILINJECT": "c"},
     b"From: joe@mx.example.com (Joe Q. Public)\n"),
    ({"MAILUSER": "joe", "USER": "x", "MAILHOST": "h.example.net"}, b"From: joe@h.example.net\n"),
    ({"USER": "u s", "NAME": 'say "hi"'}, b'From: "say \\"hi\\"" <"u s"@mx.example.com>\n'),
    ({"LOGNAME": "lg", "MAILNAME": "M", "NAME": "N"}, b'From: "M" <lg@mx.example.com>\n'),
    ({}, b"From: anonymous@mx.example.com\n"),
])
def test_from_line_variables(example_root, env, wanted):
    code, out = inject_n(example_root, DATE + MSGID + b"To: a@b.c\n\n", env=env)
    assert code == 0 and wanted in out


def test_existing_fields_are_kept_or_deleted_by_flags(example_root):
    given_ = b"Date: whenever\nMessage-ID: <mine>\nFrom: me\nTo: a@b.c\n\n"
    code, out = inject_n(example_root, given_)
    assert out == b"Return-Path: <u@mx.example.com>\nDate: whenever\nMessage-ID: <mine>\nFrom: me@mx.example.com\nTo: a@b.c\n\n"
    code, out = inject_n(example_root, given_, env={"QMAILUSER": "u", "QMAILINJECT": "fi"})
    assert b"<mine>" not in out and b"From: me" not in out
    assert b"\nFrom: u@mx.example.com\n" in out and re.search(rb"Message-ID: <\d{14}\.", out)


def test_resent_message_gets_resent_fields(example_root):
    code, out = inject_n(example_root, DATE + MSGID + b"From: f@g.h\nTo: a@b.c\nResent-To: r\n\n")
    lines = out.split(b"\n")
    assert lines[1].startswith(b"Resent-Date: ") and lines[2].startswith(b"Resent-Message-ID: <")
    assert lines[3] == b"Resent-From: u@mx.example.com"
    assert lines[4:9] == [DATE.strip(), MSGID.strip(), b"From: f@g.h", b"To: a@b.c", b"Resent-To: r@mx.example.com"]
    code, out = inject_n(example_root, b"Resent-From: x@y.z\n\n")
    assert b"Resent-Cc: recipient list not shown: ;\n" in out and b"\nCc:" not in out


def test_mail_followup_to(example_root, tmp_path):
    lists = tmp_path / "lists"
    lists.write_text("List@Example.COM\n")
    env = {"QMAILUSER": "u", "QMAILMFTFILE": str(lists)}
    code, out = inject_n(example_root, DATE + MSGID + b"From: f@g.h\nTo: a@b.c, list@example.com\nCc: c@d.e\n\n", env=env)
    assert out.startswith(b"Return-Path: <u@mx.example.com>\n"
                          b"Mail-Followup-To: c@d.e,\n  a@b.c,\n  list@example.com\n" + DATE)
    code, out = inject_n(example_root, DATE + MSGID + b"From: f@g.h\nTo: a@b.c\n\n", env=env)
    assert b"Mail-Followup-To" not in out
    env["QMAILMFTFILE"] = str(tmp_path / "missing")
    assert inject_n(example_root, b"To: list@example.com\n\n", env=env)[0] == 0


# ---------------------------------------------------------------- §7.6: recipients and the envelope

ORDER_MSG = b"To: a, b\nCc: c\nBcc: d, e\nApparently-To: f\nSubject: order\n\nbody\n"


def q(*names: str) -> list[str]:
    return [f"{n}@{ME}" for n in names]


@pytest.mark.parametrize("flags, args, wanted", [
    ([], [], q("b", "a", "c", "e", "d", "f")),  # -A, no args: the header, each field right to left
    ([], ["x", "y"], q("x", "y")),  # -A with args: the args only
    (["-a"], ["x"], q("x")),
    (["-h"], ["x"], q("b", "a", "c", "e", "d", "f")),
    (["-H"], ["x", "y"], q("x", "y", "b", "a", "c", "e", "d", "f")),
])
def test_recipient_choice_and_order(smarthost, qq, flags, args, wanted):
    extra, read = qq
    p = run(command("qmail-inject") + flags + args, ORDER_MSG, smarthost.env(**extra))
    assert p.returncode == 0, p.stderr
    message, sender, recipients = read()
    assert recipients == wanted
    assert b"Bcc" not in message and b"d@" not in message


def test_resent_recipients_only(smarthost, qq):
    extra, read = qq
    p = run(command("qmail-inject"), b"To: a\nResent-To: r1, r2\nResent-Bcc: r3\n\n", smarthost.env(**extra))
    assert p.returncode == 0, p.stderr
    message, _, recipients = read()
    assert recipients == q("r2", "r1", "r3")
    assert b"Resent-Bcc" not in message and b"Resent-To: r1@" in message


@pytest.mark.parametrize("flags, env, given_, wanted", [
    (["-f", "bounce"], {}, b"", f"bounce@{ME}"),
    (["-fbounce@far"], {}, b"", "bounce@far.test.invalid"),
    (["-f", ""], {}, b"", ""),
    (["-f", "<>"], {}, b"", ""),
    (["-f", "x@y.z"], {}, b"Return-Path: <rp@y.z>\n", "x@y.z"),
    ([], {}, b"Return-Path: <rp@y.z>\nReturn-Path: <second@y.z>\n", "rp@y.z"),
    ([], {"QMAILINJECT": "s", "QMAILUSER": "me"}, b"Return-Path: <rp@y.z>\n", f"me@{ME}"),
    ([], {"QMAILUSER": "me", "QMAILSUSER": "bb", "QMAILSHOST": "b.af.mil"}, b"", "bb@b.af.mil"),
    ([], {"QMAILUSER": "me", "QMAILHOST": "h.example.net"}, b"", "me@h.example.net"),
    ([], {"QMAILINJECT": "r", "QMAILUSER": "me"}, b"", f"me-@{ME}-@[]"),
    ([], {"QMAILINJECT": "r"}, b"Return-Path: <rp@y.z>\n", "rp@y.z-@[]"),
])
def test_envelope_sender(smarthost, qq, flags, env, given_, wanted):
    extra, read = qq
    p = run(command("qmail-inject") + flags + ["example"], given_ + b"Subject: s\n\n", smarthost.env(**extra, **env))
    assert p.returncode == 0, p.stderr
    message, sender, _ = read()
    assert sender == wanted
    assert b"Return-Path" not in message


def test_per_message_verp(smarthost, qq):
    extra, read = qq
    before = int(time.time())
    p = run(command("qmail-inject") + ["example"], b"\n",
            smarthost.env(QMAILINJECT="rm", QMAILSUSER="bb", QMAILSHOST="b.af.mil", **extra))
    assert p.returncode == 0, p.stderr
    _, sender, _ = read()
    m = re.fullmatch(r"bb-(\d+)\.(\d+)-@b\.af\.mil-@\[\]", sender)
    assert m and before <= int(m.group(1)) <= time.time()


# ---------------------------------------------------------------- end to end through the smart host

def test_delivered_headers_follow_qmail(smarthost):
    env = smarthost.env(QMAILUSER="sender", QMAILNAME="Sender Name")
    p = run(command("qmail-inject"), b"To: example, example-cc@mx\nBcc: example-bcc@mx+\n"
            b"Subject: e2e-1\n\nhello\n", env)
    assert p.returncode == 0 and p.stderr == b""
    got = smarthost.messages(b"e2e-1", 3)
    delivered = sorted(re.search(rb"^Delivered-To: (.*)$", m, re.M).group(1) for m in got)
    assert delivered == [f"example-bcc@{ME}".encode(), f"example-cc@{ME}".encode(), f"example@{ME}".encode()]
    h = header_of(got[0])
    assert h["return-path"] == [f"<sender@{ME}>"]
    assert re.fullmatch(r"\d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d -0000", h["date"][0])
    assert re.fullmatch(r"<\d{14}\.\d+\.qmail@ws\.test\.invalid>", h["message-id"][0])
    assert h["from"] == [f'"Sender Name" <sender@{ME}>']
    assert h["to"] == [f"example@{ME}, example-cc@{ME}"]
    assert "bcc" not in h
    assert got[0].endswith(b"\n\nhello\n")


def test_arguments_are_qualified_like_the_table(smarthost):
    args = ["example", "example-t1@mx", "example-t2@mx.", "example-t3@mx+", "example-t4@"]
    p = run(command("qmail-inject") + args, b"Subject: e2e-table\n\n", smarthost.env())
    assert p.returncode == 0, p.stderr
    got = smarthost.messages(b"e2e-table", 5)
    assert sorted(re.search(rb"^Delivered-To: (.*)$", m, re.M).group(1).decode() for m in got) == \
        sorted([f"example@{ME}"] + [f"example-t{i}@{ME}" for i in range(1, 5)])


def test_permanent_and_temporary_refusals(smarthost, tmp_path):
    long_rcpt = "x" * 1100 + "@" + ME
    p = run(command("qmail-inject") + [long_rcpt], b"Subject: s\n\n", smarthost.env())
    assert p.returncode == 100
    assert p.stderr == b"qmail-inject: fatal: envelope address too long for qq (#5.1.3)\n"
    dead = write_control(tmp_path / "dead", me="ws.test.invalid", qmqpservers="127.0.0.1:1")
    p = run(command("qmail-inject") + ["example"], b"Subject: s\n\n", clean_env(dead))
    assert p.returncode == 111
    assert p.stderr == b"qmail-inject: fatal: connection to mail server rejected (#4.4.1)\n"


# ---------------------------------------------------------------- bad input: one line, qmail's code, nothing sent

@pytest.mark.parametrize("args, given_, wanted", [
    ([], b"To: a@@b\nSubject: bad-1\n\n", "unable to parse this line: To: a@@b"),
    ([], b'To: "unbalanced\nSubject: bad-2\n\n', "unable to parse this line: To: \"unbalanced"),
    ([], b"To: Joe <joe@x\nSubject: bad-3\n\n", "unable to parse this line: To: Joe <joe@x"),
    ([], b"To: joe@x>\nSubject: bad-4\n\n", "unable to parse this line: To: joe@x>"),
    ([], b"From: x ) b\nTo: example\nSubject: bad-5\n\n", "unable to parse this line: From: x ) b"),
    ([], b"To: <>\nSubject: bad-6\n\n", "<> is not a recipient: To: <>"),
    ([], b"Subject: bad-7\n\n", "no recipients"),
    (["-a"], b"To: example\nSubject: bad-8\n\n", "no recipients"),
    (["a@@b"], b"Subject: bad-9\n\n", "unable to parse address: a@@b"),
    (["<>"], b"Subject: bad-10\n\n", "unable to parse address: <>"),
    (["x@(y"], b"Subject: bad-11\n\n", "unable to parse address: x@(y"),
    (["x@y>"], b"Subject: bad-13\n\n", "unable to parse address: x@y>"),
    (["-h", "ignored"], b"To: @\nSubject: bad-12\n\n", "<> is not a recipient: To: @"),
])
def test_bad_input_sends_nothing(smarthost, args, given_, wanted):
    p = run(command("qmail-inject") + args, given_, smarthost.env())
    assert p.returncode == 100
    err = p.stderr.decode()
    assert err.startswith(f"qmail-inject: fatal: {wanted}") and err.count("\n") == 1, err
    marker = re.search(rb"bad-\d+", given_).group(0)
    assert smarthost.absent(marker, wait=0.1)


@pytest.mark.parametrize("given_, wanted", [
    (b"Subject: " + b"x" * (64 * 1024) + b"\n\n", "a header field is longer than 65536 bytes"),
    (b"Subject: x\n" + b" continued\n" * 7000 + b"\n", "a header field is longer than 65536 bytes"),
    (b"".join(b"X-F%d: %s\n" % (i, b"y" * 1000) for i in range(1100)) + b"\n",
     "the header is longer than 1048576 bytes"),
])
def test_header_limits(example_root, given_, wanted):
    p = run(command("qmail-inject") + ["-n"], given_, clean_env(example_root))
    assert p.returncode == 100 and p.stdout == b""
    assert p.stderr.decode() == f"qmail-inject: fatal: {wanted}; nothing was sent\n"


def test_a_long_first_body_line_is_no_header(example_root):
    body = b"z" * 200_000 + b"\n"
    p = run(command("qmail-inject") + ["-n"], b"To: a@b.c\n" + body, clean_env(example_root))
    assert p.returncode == 0 and p.stdout.endswith(b"To: a@b.c\n\n" + body)


def test_unreadable_control_file_is_temporary(example_root, tmp_path):
    (example_root / "control" / "defaultdomain").unlink()
    (example_root / "control" / "defaultdomain").mkdir()
    p = run(command("qmail-inject") + ["-n"], b"\n", clean_env(example_root))
    assert p.returncode == 111
    assert p.stderr.decode().startswith("qmail-inject: fatal: unable to read ") and p.stderr.count(b"\n") == 1
    p = run(command("qmail-inject") + ["-n"], b"\n", clean_env(tmp_path / "nowhere"))
    assert p.returncode == 111 and b"unable to switch to" in p.stderr


def test_usage_errors(example_root):
    for args, text in ((["-x"], "illegal option -- x"), (["-f"], "option requires an argument -- f")):
        p = run(command("qmail-inject") + args, b"", clean_env(example_root))
        assert p.returncode == 100 and p.stderr.decode() == f"qmail-inject: {text}\n"


def test_binary_junk_never_crashes(example_root):
    junk = bytes(range(256)) * 40 + b"\nTo: \x00\xff\n\n\x00"
    p = run(command("qmail-inject") + ["-n"], junk, clean_env(example_root))
    assert p.returncode in (0, 100) and b"Traceback" not in p.stderr


#: Runs argv[2:] and writes its peak RSS to argv[1]. A child of the test runner itself would
#: count the runner's own memory: Linux carries the RSS at fork() into the child's maximum.
PEAK_RSS = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
os._exit(os.waitstatus_to_exitcode(status))
"""


def _peak_run(argv: list[str], data_size: int, env: dict[str, str], tmp_path: Path) -> tuple[int, int, int]:
    """Run `argv` with `data_size` body bytes on stdin; (exit code, bytes out, peak RSS in KiB)."""
    report = tmp_path / "peak"
    proc = subprocess.Popen([sys.executable, "-c", PEAK_RSS, str(report), *argv], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)
    import threading

    count = [0]

    def drain() -> None:
        while chunk := proc.stdout.read(1 << 16):
            count[0] += len(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    proc.stdin.write(b"Subject: big\n\n")
    line = b"0123456789" * 7 + b"\n"
    block = line * (65536 // len(line))
    sent = 0
    while sent < data_size:
        proc.stdin.write(block)
        sent += len(block)
    proc.stdin.close()
    code = proc.wait(60)
    reader.join()
    return code, count[0], int(report.read_text())


def test_memory_stays_flat_while_printing_a_big_message(example_root, tmp_path):
    code, out, peak_kib = _peak_run(command("qmail-inject") + ["-n"], 64 << 20, clean_env(example_root), tmp_path)
    assert code == 0 and out > 64 << 20
    assert peak_kib < 40 * 1024, f"peak RSS {peak_kib} KiB for a 64 MiB message"


def test_memory_stays_flat_while_sending_a_big_message(smarthost, tmp_path):
    code, _, peak_kib = _peak_run(command("qmail-inject") + ["example-big"], 24 << 20, smarthost.env(), tmp_path)
    assert code == 0
    assert peak_kib < 40 * 1024, f"peak RSS {peak_kib} KiB for a 24 MiB message"
    [m] = smarthost.messages(b"Subject: big\n")
    assert len(m) > 24 << 20 and m.endswith(b"0123456789\n")


# ---------------------------------------------------------------- properties: any input, a value or the documented error

@hsettings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=255), max_size=120))
def test_address_parser_total(text):
    q = Qualifier("mx.example.com", "example.com", "plus.example.org")
    try:
        tokens = address.tokenize("To: " + text)
        rewritten = address.addrlist(tokens, q.rewrite)
    except AddressError:
        return
    line = address.unparse(rewritten)
    assert line.endswith("\n") and line.startswith("To:")
    for problem in (address.check(a, null_ok=True) for a in [address.tokenize(text)]):
        assert problem is None or isinstance(problem, str)
    try:
        address.addrlist(address.tokenize(line), q.rewrite)  # qmail can print what it cannot read back
        q.qualify(text)
    except AddressError:
        pass


@hsettings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_header_reader_total(data):
    stream = io.BufferedReader(io.BytesIO(data))
    try:
        header = headers.read(stream)
    except headers.HeaderError:
        return
    rest = stream.read()
    slow = io.BufferedReader(OneByte(data), buffer_size=1)
    assert headers.read(slow) == header and slow.read() == rest
    for f in header.fields:
        assert f.endswith(b"\n")
    # nothing is lost: fields, the separator and the rest give back the input (up to the MBOX-Line prefix)
    fields = list(header.fields)
    if data.startswith(b"From ") and fields and fields[0].startswith(b"MBOX-Line: "):
        fields[0] = fields[0][len(b"MBOX-Line: "):]  # only a leading From_ line gets the prefix
    joined = b"".join(fields)
    after = header.after if header.after == b"\n" else (header.after or b"\n")[1:]
    assert (joined + after + rest).rstrip(b"\n") == data.rstrip(b"\n")


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([b"To: ", b"Cc: ", b"From: ", b"Bcc: ", b"Resent-To: ", b"Return-Path: ",
                                 b"Subject: ", b" ", b"\n", b"<", b">", b"@", b",", b";", b":", b"\"", b"(",
                                 b")", b"[", b"]", b"\\", b".", b"a", b"b+", b"\xff", b"\r", b"\x00"]),
                max_size=40))
def test_inject_total(example_root, pieces):
    code, out = inject_n(example_root, b"".join(pieces))
    assert code in (0, 100)
    if code == 0:
        assert out.startswith(b"Return-Path: <")
