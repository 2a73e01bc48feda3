"""qmail-qmqpc and the in-process hand-off, against a real QMQP peer on loopback sockets.

The peer below is a small QMQP server (one thread, one listening socket on an
ephemeral port) that records each request and answers as a test tells it:
K/Z/D, garbage, an early close, or a stall.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from miniqmail import envelope, netstring, qmqp, qmqpservers
from miniqmail.exitcodes import QQ
from miniqmail.handoff import HandoffResult, handoff

pytestmark = pytest.mark.timeout(60)

TOP = Path(__file__).resolve().parent.parent
KEEP_MAX = 8 << 20  # requests up to this size are kept whole; bigger ones as a digest


class Peer:
    """A QMQP server on `host`: records requests, then behaves as `behaviour` says."""

    def __init__(self, host: str = "127.0.0.1", reply: bytes = b"Kok 1795247823 qp 15670",
                 behaviour: str = "answer", family: int = socket.AF_INET, backlog: int = 16):
        self.reply = reply
        self.behaviour = behaviour
        self.requests: list[bytes | tuple[int, str]] = []
        self.connections = 0
        self.before_reply = None
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(backlog)
        self.listener.settimeout(0.05)
        self.host = host
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def line(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self._handle(conn)
        self.listener.setblocking(False)  # count what is still waiting in the backlog
        while True:
            try:
                self.listener.accept()[0].close()
            except OSError:
                break
            self.connections += 1

    def _read_request(self, f) -> bytes | tuple[int, str]:
        n = netstring.read_length(f, 10**9)
        digest = hashlib.sha256()
        kept = bytearray()
        left = n
        while left:
            chunk = f.read(min(left, 1 << 16))
            if not chunk:
                raise netstring.NetstringError("short request")
            digest.update(chunk)
            if n <= KEEP_MAX:
                kept += chunk
            left -= len(chunk)
        netstring.read_comma(f)
        return bytes(kept) if n <= KEEP_MAX else (n, digest.hexdigest())

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            if self.behaviour == "close-at-once":
                return
            try:
                self.requests.append(self._read_request(conn.makefile("rb")))
            except (OSError, netstring.NetstringError):
                return
            if self.before_reply is not None:
                self.before_reply()
            try:
                if self.behaviour == "answer":
                    conn.sendall(netstring.encode(self.reply))
                elif self.behaviour == "garbage":
                    conn.sendall(self.reply)
                elif self.behaviour == "stall":
                    while not self._stop.is_set() and conn.recv(1):
                        pass  # wait for the client to give up
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.listener.close()


@pytest.fixture
def peers():
    started: list[Peer] = []

    def start(*args, **kwargs) -> Peer:
        p = Peer(*args, **kwargs)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def closed_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on: bound, then closed."""
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def make_root(tmp_path: Path, servers: list[str] | None, **control: int) -> str:
    root = tmp_path / "mq"
    (root / "control").mkdir(parents=True)
    if servers is not None:
        (root / "control" / "qmqpservers").write_text("".join(s + "\n" for s in servers))
    for name, value in control.items():
        (root / "control" / name).write_text(f"{value}\n")
    return str(root)


MESSAGE = b"From: a@example.invalid\nSubject: hi\n\nhello\n"


def send(root: str, message: bytes = MESSAGE, sender: str = "a@example.invalid",
         recipients: tuple[str, ...] = ("b@example.invalid",)) -> HandoffResult:
    return handoff(io.BytesIO(message), sender, list(recipients), root=root)


# --- the codec -------------------------------------------------------------

def test_request_is_exactly_qmqp(tmp_path, peers):
    peer = peers()
    root = make_root(tmp_path, [peer.line])
    result = send(root, recipients=("b@example.invalid", "c@example.invalid"))
    assert result == HandoffResult(0, "Kok 1795247823 qp 15670")
    (inner,) = peer.requests
    assert list(netstring.split(inner)) == [MESSAGE, b"a@example.invalid",
                                            b"b@example.invalid", b"c@example.invalid"]
    assert netstring.encode(inner) == qmqp.encode_request(
        MESSAGE, "a@example.invalid", ["b@example.invalid", "c@example.invalid"])


def test_request_with_empty_sender_and_no_recipients():
    raw = qmqp.encode_request(b"", "", [])
    assert raw == b"6:0:,0:,,"
    req = qmqp.Request.build(5, "", ["x@y"])
    assert req.length == len(qmqp.encode_request(b"12345", "", ["x@y"]))


@pytest.mark.parametrize("raw, expected", [
    (b"3:Kok,", qmqp.Reply(qmqp.Letter.K, "ok")),
    (b"8:Dno (#5),", qmqp.Reply(qmqp.Letter.D, "no (#5)")),
    (b"1:Z,", qmqp.Reply(qmqp.Letter.Z, "")),
    (b"4:Ka\x1bb,", qmqp.Reply(qmqp.Letter.K, "a?b")),
])
def test_reply_whole_byte_by_byte_and_with_trailing_bytes(raw, expected):
    assert qmqp.parse_reply(raw) == expected
    assert qmqp.parse_reply(raw + b"trailing") == expected
    reader = qmqp.ReplyReader()
    results = [reader.feed(raw[i:i + 1]) for i in range(len(raw))]
    assert results[-1] == expected and all(r is None for r in results[:-1])


@pytest.mark.parametrize("raw", [b"", b"0:,", b"3:Xok,", b"3:Kok", b"3:Kok;", b"03:Kok,",
                                 b"Kok", b"-1:K,", b"99999999999:K"])
def test_bad_replies_are_protocol_failures(raw):
    assert isinstance(qmqp.parse_reply(raw), qmqp.ProtocolFailure)


def test_reply_over_the_limit_is_refused_before_it_arrives():
    assert qmqp.parse_reply(b"65537:") == qmqp.ProtocolFailure("reply too long")


@hsettings(max_examples=500)
@given(st.binary(max_size=64) | st.builds(lambda n, b: netstring.header(n) + b,
                                          st.integers(0, 70000), st.binary(max_size=64)))
def test_any_bytes_give_a_result_never_an_exception(data):
    whole = qmqp.parse_reply(data)
    assert isinstance(whole, (qmqp.Reply, qmqp.ProtocolFailure))
    reader = qmqp.ReplyReader()
    result = None
    for i in range(len(data)):
        result = reader.feed(data[i:i + 1])
        if result is not None:
            break
    assert (result or reader.eof()) == whole


def test_qmqpservers_lines():
    parse = qmqpservers.parse_line
    S = qmqpservers.Server
    assert parse("1.2.3.4") == S("1.2.3.4", 628)
    assert parse("1.2.3.4:2628") == S("1.2.3.4", 2628)
    assert parse("1.2.3.4 anything after blanks") == S("1.2.3.4", 628)
    assert parse("[2001:db8::1]") == S("2001:db8::1", 628)
    assert parse("[2001:db8::1]:2628") == S("2001:db8::1", 2628)
    assert parse("2001:db8::1") == S("2001:db8::1", 628)
    assert parse("mx.example.invalid") == S("mx.example.invalid", 628, literal=False)
    assert parse("mx.example.invalid:26") == S("mx.example.invalid", 26, literal=False)
    for bad in (" 1.2.3.4", "1.2.3.256", "1.2.3", "1.2.3.4:", "1.2.3.4:0", "1.2.3.4:65536",
                "1.2.3.4:x", "[::1", "[::1]x", "[1.2.3.4]", "bad_name", "-x.example", "a..b"):
        assert parse(bad) is None, bad
    assert qmqpservers.parse(["junk!", "10.0.0.1", "[::1]:1"]) == [S("10.0.0.1"), S("::1", 1)]


# --- verdicts and failover --------------------------------------------------

def test_k_is_zero(tmp_path, peers):
    assert send(make_root(tmp_path, [peers().line])).code == 0


def test_d_is_final(tmp_path, peers):
    first = peers("127.0.0.2", reply=b"Dsorry, I can't accept addresses like that (#5.1.3)")
    second = peers("127.0.0.3")
    result = send(make_root(tmp_path, [first.line, second.line]))
    assert result == HandoffResult(31, "Dsorry, I can't accept addresses like that (#5.1.3)")
    assert result.permanent
    second.stop()
    assert second.connections == 0 and len(first.requests) == 1


def test_bare_d_gets_qmails_text(tmp_path, peers):
    result = send(make_root(tmp_path, [peers(reply=b"D").line]))
    assert result == HandoffResult(31, "Dmail server permanently rejected message (#5.3.0)")


def test_z_moves_on_to_the_next_server(tmp_path, peers):
    first = peers("127.0.0.2", reply=b"Zsorry, busy (#4.3.0)")
    second = peers("127.0.0.3")
    assert send(make_root(tmp_path, [first.line, second.line])).code == 0
    assert first.requests == second.requests and len(second.requests) == 1


def test_all_z_is_71(tmp_path, peers):
    servers = [peers(h, reply=b"Zbusy (#4.3.0)").line for h in ("127.0.0.2", "127.0.0.3")]
    assert send(make_root(tmp_path, servers)) == HandoffResult(71, "Zbusy (#4.3.0)")


def test_refused_first_server_moves_on(tmp_path, peers):
    second = peers("127.0.0.3")
    root = make_root(tmp_path, ["# comment", "", f"127.0.0.2:{closed_port('127.0.0.2')}", second.line])
    assert send(root).code == 0
    assert len(second.requests) == 1


def test_all_down_is_73(tmp_path):
    root = make_root(tmp_path, [f"127.0.0.2:{closed_port('127.0.0.2')}",
                                f"127.0.0.3:{closed_port('127.0.0.3')}"])
    assert send(root) == HandoffResult(73, "Zconnection to mail server rejected (#4.4.1)")


def test_stalling_server_times_out_and_the_next_takes_it(tmp_path, peers):
    stall = peers("127.0.0.2", behaviour="stall")
    good = peers("127.0.0.3")
    assert send(make_root(tmp_path, [stall.line, good.line], timeoutremote=1)).code == 0
    assert len(stall.requests) == 1 and len(good.requests) == 1


def test_only_stalling_servers_is_74(tmp_path, peers):
    root = make_root(tmp_path, [peers(behaviour="stall").line], timeoutremote=1)
    assert send(root) == HandoffResult(74, "Zcommunication with mail server failed (#4.4.2)")


@pytest.mark.parametrize("behaviour, reply", [("garbage", b"hello there"), ("garbage", b"0:,"),
                                              ("garbage", b"3:Xok,"), ("close", b""),
                                              ("close-at-once", b"")])
def test_garbage_or_dropped_moves_on_then_74(tmp_path, peers, behaviour, reply):
    bad = peers("127.0.0.2", behaviour=behaviour, reply=reply)
    good = peers("127.0.0.3")
    assert send(make_root(tmp_path, [bad.line, good.line])).code == 0
    assert send(make_root(tmp_path / "only", [bad.line])).code == QQ.COMM_FAILED


def test_z_then_failures_is_still_71(tmp_path, peers):
    z = peers("127.0.0.2", reply=b"Zlater")
    root = make_root(tmp_path, [z.line, f"127.0.0.3:{closed_port('127.0.0.3')}"])
    assert send(root).code == QQ.TEMP_REFUSED


def test_connect_timeout_is_72(tmp_path):
    # A listener whose accept queue is full drops new SYNs: connect times out.
    full = socket.socket()
    full.bind(("127.0.0.2", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.2", port))
            fillers.append(c)
        probe = socket.socket()
        probe.settimeout(0.5)
        try:
            probe.connect(("127.0.0.2", port))
            pytest.skip("this kernel completes connects to a full listener")
        except TimeoutError:
            pass
        finally:
            probe.close()
        root = make_root(tmp_path, [f"127.0.0.2:{port}"], timeoutconnect=1)
        assert send(root) == HandoffResult(72, "Zconnection to mail server timed out (#4.4.1)")
    finally:
        for c in fillers:
            c.close()
        full.close()


def test_no_qmqpservers_is_55(tmp_path):
    assert send(make_root(tmp_path, None)).code == QQ.CONFIG
    assert send(make_root(tmp_path / "b", ["# nothing", "not_an_address!", " 10.0.0.1"])).code == QQ.CONFIG


def test_missing_root_is_61(tmp_path):
    assert send(str(tmp_path / "nowhere")).code == QQ.HOME


def test_ipv6_loopback(tmp_path, peers):
    try:
        peer = peers("::1", family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert send(make_root(tmp_path, [peer.line])).code == 0
    assert list(netstring.split(peer.requests[0]))[0] == MESSAGE


def test_hostname_entry(tmp_path, peers):
    peer = peers()
    assert send(make_root(tmp_path, [f"localhost:{peer.port}"])).code == 0


def test_big_message_from_memory_and_from_a_file_at_an_offset(tmp_path, peers):
    peer = peers()
    root = make_root(tmp_path, [peer.line])
    big = bytes(range(256)) * 12000  # over the in-memory spool: goes through a temporary file
    assert send(root, big).code == 0
    assert list(netstring.split(peer.requests[-1]))[0] == big
    path = tmp_path / "msg"
    path.write_bytes(b"SKIPPED" + big)
    with open(path, "rb") as f:
        f.read(7)
        assert handoff(f, "", ["x@y"], root=root).code == 0
    assert list(netstring.split(peer.requests[-1])) == [big, b"", b"x@y"]


def test_address_too_long_is_11_without_a_connection(tmp_path, peers):
    peer = peers()
    root = make_root(tmp_path, [peer.line])
    assert send(root, recipients=("x" * 1003,)).code == QQ.ADDRESS_TOO_LONG
    assert send(root, recipients=("x@y\0Tz@w",)).code == QQ.ENVELOPE
    peer.stop()
    assert peer.connections == 0


# --- QMAILQUEUE --------------------------------------------------------------

QUEUE_SCRIPT = """#!/bin/sh
pwd > "$OUT/cwd"
if [ -n "$ENVELOPE_FIRST" ]; then cat <&1 > "$OUT/env"; cat > "$OUT/msg"
else cat > "$OUT/msg"; cat <&1 > "$OUT/env"; fi
exit ${QQ_EXIT:-0}
"""


@pytest.mark.parametrize("envelope_first", ["", "1"])
def test_qmailqueue_runs_the_program(tmp_path, monkeypatch, envelope_first):
    script = tmp_path / "fake-queue"
    script.write_text(QUEUE_SCRIPT)
    script.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    root = make_root(tmp_path, None)
    monkeypatch.setenv("QMAILQUEUE", str(script))
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setenv("ENVELOPE_FIRST", envelope_first)
    big = b"x" * 300000 + b"\n"  # more than a pipe holds: neither order may deadlock
    rcpts = tuple(f"r{i}@example.invalid" for i in range(5000))
    assert send(root, big, recipients=rcpts) == HandoffResult(0, "Kok")
    assert (out / "msg").read_bytes() == big
    assert (out / "env").read_bytes() == envelope.encode("a@example.invalid", list(rcpts))
    assert (out / "cwd").read_text().strip() == os.path.realpath(root)
    monkeypatch.setenv("QQ_EXIT", "31")
    assert send(root) == HandoffResult(31, "Dmail server permanently rejected message (#5.3.0)")
    monkeypatch.setenv("QQ_EXIT", "73")
    assert send(root).text == "Zconnection to mail server rejected (#4.4.1)"
    monkeypatch.setenv("QMAILQUEUE", str(tmp_path / "missing"))
    assert send(root) == HandoffResult(120, "Zunable to exec qq (#4.3.0)")
    monkeypatch.setenv("QMAILQUEUE", str(script))
    assert send(str(tmp_path / "nowhere")).code == QQ.HOME
    crash = tmp_path / "crash"
    crash.write_text("#!/bin/sh\nkill -9 $$\n")
    crash.chmod(0o755)
    monkeypatch.setenv("QMAILQUEUE", str(crash))
    assert send(root) == HandoffResult(QQ.BUG, "Zqq crashed (#4.3.0)")


# --- the qmail-qmqpc program --------------------------------------------------

def start_qmqpc(root: str, env_bytes: bytes, stdin=subprocess.PIPE) -> tuple[subprocess.Popen, int]:
    env_read, env_write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "miniqmail.cli.qmail_qmqpc"], stdin=stdin,
                            stdout=env_read, stderr=subprocess.PIPE, cwd=str(TOP),
                            env=dict(os.environ, MINIQMAIL_ROOT=root))
    os.close(env_read)
    return proc, env_write


def run_qmqpc(root: str, message: bytes, env_bytes: bytes) -> tuple[int, bytes]:
    proc, env_write = start_qmqpc(root, env_bytes)
    writer = threading.Thread(target=lambda: (os.write(env_write, env_bytes), os.close(env_write)))
    writer.start()
    try:
        _, err = proc.communicate(message, timeout=30)
    except BrokenPipeError:
        err = proc.stderr.read()
    proc.wait(30)
    writer.join(30)
    return proc.returncode, err


def test_program_delivers_and_prints_nothing(tmp_path, peers):
    peer = peers()
    root = make_root(tmp_path, [f"127.0.0.2:{closed_port('127.0.0.2')}", peer.line])
    code, err = run_qmqpc(root, MESSAGE, envelope.encode("a@b", ["c@d", "e@f"]))
    assert (code, err) == (0, b"")
    assert list(netstring.split(peer.requests[0])) == [MESSAGE, b"a@b", b"c@d", b"e@f"]


def test_program_with_a_regular_file_on_fd0(tmp_path, peers):
    peer = peers(reply=b"Dno")
    root = make_root(tmp_path, [peer.line])
    path = tmp_path / "msg"
    path.write_bytes(MESSAGE)
    env_bytes = envelope.encode("", ["c@d"])
    with open(path, "rb") as f:
        proc, env_write = start_qmqpc(root, env_bytes, stdin=f)
        os.write(env_write, env_bytes)
        os.close(env_write)
        assert proc.wait(30) == QQ.PERM_REFUSED
    assert list(netstring.split(peer.requests[0])) == [MESSAGE, b"", b"c@d"]


@pytest.mark.parametrize("env_bytes, code", [
    (b"Fa@b\0Tc@d\0", QQ.ENVELOPE),           # no final NUL
    (b"Xa@b\0\0", QQ.ENVELOPE),
    (b"Fa@b\0Xc@d\0\0", QQ.ENVELOPE),
    (b"", QQ.ENVELOPE),
    (b"Fa@b\0T" + b"x" * 1003 + b"\0\0", QQ.ADDRESS_TOO_LONG),
])
def test_program_bad_envelope_before_any_connection(tmp_path, peers, env_bytes, code):
    peer = peers()
    root = make_root(tmp_path, [peer.line])
    assert run_qmqpc(root, MESSAGE, env_bytes) == (code, b"")
    peer.stop()
    assert peer.connections == 0


def test_program_config_and_home_failures(tmp_path):
    good = envelope.encode("a@b", ["c@d"])
    assert run_qmqpc(make_root(tmp_path, None), MESSAGE, good)[0] == QQ.CONFIG
    assert run_qmqpc(make_root(tmp_path / "b", ["no_good"]), MESSAGE, good)[0] == QQ.CONFIG
    assert run_qmqpc(str(tmp_path / "nowhere"), MESSAGE, good)[0] == QQ.HOME
    down = make_root(tmp_path / "c", [f"127.0.0.2:{closed_port('127.0.0.2')}"])
    assert run_qmqpc(down, MESSAGE, good)[0] == QQ.CONNECT_REFUSED
    no_fd1 = subprocess.run([sys.executable, "-m", "miniqmail.cli.qmail_qmqpc"], input=MESSAGE,
                            capture_output=False, stderr=subprocess.PIPE, cwd=str(TOP), timeout=30,
                            env=dict(os.environ, MINIQMAIL_ROOT=down), preexec_fn=lambda: os.close(1))
    assert (no_fd1.returncode, no_fd1.stderr) == (QQ.READ, b"")


def test_program_50mb_message_keeps_memory_flat(tmp_path, peers):
    size = 50 * 1024 * 1024
    line = b"0123456789abcdef" * 63 + b"0123456789abcde\n"  # 1 KiB
    chunk = line * 64
    env_bytes = envelope.encode("big@example.invalid", ["r@example.invalid"])
    tail = b"," + netstring.encode(b"big@example.invalid") + netstring.encode(b"r@example.invalid")
    expected = hashlib.sha256(netstring.header(size))
    for _ in range(size // len(chunk)):
        expected.update(chunk)
    expected.update(tail)

    peer = peers()
    root = make_root(tmp_path, [peer.line])
    proc, env_write = start_qmqpc(root, env_bytes)
    peak: list[int] = []

    def read_peak() -> None:  # the client waits for the reply: its peak is behind it
        for row in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if row.startswith("VmHWM:"):
                peak.append(int(row.split()[1]) * 1024)

    peer.before_reply = read_peak

    def feed() -> None:
        for _ in range(size // len(chunk)):
            proc.stdin.write(chunk)
        proc.stdin.close()
        os.write(env_write, env_bytes)
        os.close(env_write)

    feeder = threading.Thread(target=feed)
    feeder.start()
    assert proc.wait(50) == 0
    feeder.join(10)
    assert proc.stderr.read() == b""
    proc.stderr.close()
    assert peer.requests == [(len(netstring.header(size)) + size + len(tail), expected.hexdigest())]
    assert peak and peak[0] < 60 * 1024 * 1024, peak


def test_program_imports_stay_lean():
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", "import miniqmail.cli.qmail_qmqpc"],
                       capture_output=True, text=True, cwd=str(TOP), timeout=30)
    assert p.returncode == 0, p.stderr
    loaded = {row.rsplit("|", 1)[1].strip().split(".")[0]
              for row in p.stderr.splitlines() if row.startswith("import time:") and "|" in row}
    assert "miniqmail" in loaded
    assert not loaded & {"asyncio", "click", "dns", "email", "subprocess", "threading", "smarthost"}
