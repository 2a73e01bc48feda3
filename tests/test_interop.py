"""Interop with independent QMQP implementations: Postfix's qmqp-sink and qmqp-source,
nullmailer's qmqp protocol helper. Each test skips with its reason when the peer is absent."""

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from miniqmail import envelope
from tests.conftest import Daemon, program, wait_files

pytestmark = pytest.mark.timeout(120)
TOP = Path(__file__).resolve().parent.parent
ME = "mx.test.invalid"


def peer(path: str, package: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"{path} not installed (Debian package {package}; .ci/run installs it)")
    return path


def nullmailer_qmqp() -> str:
    for p in (os.environ.get("NULLMAILER_QMQP", ""), str(TOP / "var/peers/nullmailer/usr/lib/nullmailer/qmqp"),
              "/usr/lib/nullmailer/qmqp"):
        if p and os.path.exists(p):
            return p
    pytest.skip("nullmailer's qmqp helper not found (.ci/run unpacks Debian's nullmailer into var/peers)")


def free_port(host="127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), 0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def client_root(tmp_path, servers: list[str]) -> dict:
    ctl = tmp_path / "mini" / "control"
    ctl.mkdir(parents=True, exist_ok=True)
    (ctl / "qmqpservers").write_text("".join(s + "\n" for s in servers))
    (ctl / "me").write_text("ws.test.invalid\n")
    return dict(os.environ, MINIQMAIL_ROOT=str(tmp_path / "mini"))


def qmqpc(env, message: bytes, sender: str, rcpts: list[str]) -> int:
    rfd, wfd = os.pipe()
    os.write(wfd, envelope.encode(sender, rcpts))
    os.close(wfd)
    try:
        return subprocess.run([program("qmail-qmqpc")], input=message, stdout=rfd, env=env, timeout=60).returncode
    finally:
        os.close(rfd)


def test_our_client_into_postfix_qmqp_sink(tmp_path):
    sink = peer("/usr/sbin/qmqp-sink", "postfix")
    port = free_port()
    proc = subprocess.Popen([sink, "-c", f"127.0.0.1:{port}", "5"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_port("127.0.0.1", port)
        env = client_root(tmp_path, [f"127.0.0.1:{port}"])
        for i in range(3):
            assert qmqpc(env, b"Subject: to postfix %d\n\nbody\n" % i, "me@ws.test.invalid",
                         ["a@far.example", "b@far.example"]) == 0
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def listening(root):
    started = []

    def start():
        d = Daemon(root, ["--qmqp", "127.0.0.1:0"])
        started.append(d)
        line = d.wait_log("qmqpd: listening on")
        port = int(re.search(r":(\d+)\s*$", line).group(1))
        return d, port

    yield start
    for d in started:
        d.stop()


def test_postfix_qmqp_source_into_our_server(root, listening):
    source = peer("/usr/sbin/qmqp-source", "postfix")
    d, port = listening()
    p = subprocess.run([source, "-f", "sender@far.example", "-t", f"example@{ME}", "-l", "1000",
                        "-m", "20", "-s", "5", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    files = wait_files(root.sub("home", "example", "Maildir", "new"), 20)
    data = open(files[0], "rb").read()
    assert re.search(rb"^Received: from unknown \(\S*127\.0\.0\.1\)\n  by \S+ with QMQP; ", data, re.M)
    assert data.startswith(b"Return-Path: <sender@far.example>\nDelivered-To: example@" + ME.encode())


def test_nullmailer_qmqp_helper_into_our_server(root, listening, tmp_path):
    helper = nullmailer_qmqp()
    d, port = listening()
    mail = tmp_path / "mail"
    mail.write_bytes(b"nm@far.example\nexample@" + ME.encode() + b"\n\nSubject: from nullmailer\n\nhello\n")
    # the helper reads the message on fd 3, which must be seekable: let a shell open it there
    p = subprocess.run(["/bin/sh", "-c", 'exec "$0" "$@" 3<"$MAILFILE"', helper,
                        "--host=127.0.0.1", f"--port={port}"], stdin=subprocess.DEVNULL,
                       env=dict(os.environ, MAILFILE=str(mail)), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    [path] = wait_files(root.sub("home", "example", "Maildir", "new"))
    data = open(path, "rb").read()
    assert data.startswith(b"Return-Path: <nm@far.example>\n") and data.endswith(b"Subject: from nullmailer\n\nhello\n")
