"""qmail-remote, qmail-tcpto and qmail-tcpok as programs: qmail's arguments, output and exit codes."""

import ipaddress
import os
import struct
import subprocess
import sys
import time

import pytest

from smarthost.remote.tcpto import TcptoFiles
from tests.conftest import BIN
from tests.remote_peers import MESSAGE

pytest_plugins = ["tests.remote_site"]  # the `site` fixture
pytestmark = pytest.mark.timeout(60)


def command(name: str) -> list[str]:
    script = BIN / name
    module = "smarthost.cli." + name.replace("-", "_")
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def run(site, name, *args, stdin=None, data=None):
    env = dict(os.environ, SMARTHOST_ROOT=site.root.path)
    return subprocess.run(command(name) + list(args), stdin=stdin, input=data, capture_output=True,
                          env=env, timeout=30)


def test_qmail_remote_reports_per_recipient_then_the_message(site, tmp_path):
    site.mx("e.test", (10, "mx.e.test", "127.0.0.2"))
    peer = site.smtp("127.0.0.2", replies={"RCPT": lambda a: b"550 5.1.1 unknown\r\n" if a.startswith("bad")
                                           else b"250 ok\r\n"})
    msg = tmp_path / "msg"
    msg.write_bytes(MESSAGE)
    with open(msg, "rb") as f:
        p = run(site, "qmail-remote", "e.test", "s@here.test", "a@e.test", "bad@e.test", stdin=f)
    assert p.returncode == 0 and p.stderr == b""
    assert p.stdout == (b"r\0"
                        b"h127.0.0.2 does not like recipient.\nRemote host said: 550 5.1.1 unknown\n\0"
                        b"K127.0.0.2 accepted message.\nRemote host said: 250 ok 1234 qp 5678\n\0")
    assert peer.mails[0].rcpts == ["a@e.test"]


def test_qmail_remote_message_on_a_pipe_by_qmtp(site):
    site.mx("q.test", (12801, "mx.q.test", "127.0.0.2"))
    qpeer = site.qmtp("127.0.0.2")
    p = run(site, "qmail-remote", "q.test", "", "a@q.test", data=MESSAGE)
    assert p.returncode == 0
    assert p.stdout == b"r\0K127.0.0.2 accepted message.\nRemote host said: ok thanks\n\0"
    assert qpeer.packages == [(b"\n" + MESSAGE, "", ["a@q.test"])]


def test_qmail_remote_failures_before_any_recipient(site):
    p = run(site, "qmail-remote", "missing.test", "s@here.test", "a@missing.test", data=MESSAGE)
    assert (p.returncode, p.stdout) == (0, b"DSorry, I couldn't find any host named missing.test. (#5.1.2)\n\0")
    p = run(site, "qmail-remote", "only-a-host", data=b"")
    assert (p.returncode, p.stdout) == (0, b"DI (qmail-remote) was invoked improperly. (#5.3.5)\n\0")
    os.mkdir(os.path.join(site.root.control_dir, "smtproutes"))  # unreadable
    p = run(site, "qmail-remote", "e.test", "s@here.test", "a@e.test", data=MESSAGE)
    assert (p.returncode, p.stdout) == (0, b"ZUnable to read control files. (#4.3.0)\n\0")


def test_qmail_tcpto_lists_and_qmail_tcpok_clears(site):
    lockdir = os.path.join(site.root.queue_dir, "lock")
    # a record as qmail's tcpto.c writes it: address, count, 3 unused, LE time, 4 unused
    when = int(time.time()) - 100
    record = bytes([192, 0, 2, 9, 3, 0, 0, 0]) + struct.pack("<I", when) + bytes(4)
    with open(os.path.join(lockdir, "tcpto"), "wb") as f:
        f.write(bytes(16) + record + bytes(1024 - 32))
    TcptoFiles(lockdir).note(ipaddress.ip_address("2001:db8::7"), True, now=when)
    p = run(site, "qmail-tcpto")
    assert p.returncode == 0
    lines = p.stdout.decode().splitlines()
    assert len(lines) == 2
    for line, ip, count in zip(lines, ["192.0.2.9", "2001:db8::7"], [3, 1]):
        ip_, rest = line.split(" ", 1)
        assert ip_ == ip
        secs = int(rest.split()[2])
        assert 99 <= secs <= 130 and rest.endswith(f"seconds ago; # recent timeouts: {count}")
    p = run(site, "qmail-tcpok")
    assert (p.returncode, p.stdout, p.stderr) == (0, b"", b"")
    assert open(os.path.join(lockdir, "tcpto"), "rb").read() == bytes(1024)
    assert run(site, "qmail-tcpto").stdout == b""


def test_tcpto_programs_without_a_queue_fail_cleanly(tmp_path):
    env = dict(os.environ, SMARTHOST_ROOT=str(tmp_path))
    for name in ("qmail-tcpto", "qmail-tcpok"):
        p = subprocess.run(command(name), capture_output=True, text=True, env=env, timeout=30)
        assert p.returncode == 111
        assert p.stderr.startswith(f"{name}: fatal: unable to chdir to ") and p.stderr.count("\n") == 1
