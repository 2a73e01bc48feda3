"""QMQP server: the pure session, the stdio qmail-qmqpd, the daemon's listener on real sockets."""

import asyncio
import io
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st

from miniqmail import netstring
from smarthost import evloop, tcprules
from smarthost.qmqp_session import (BAD_ADDRESS, NEED_DATA, NO_RECIPIENTS, TOO_BIG, QmqpError,
                                    QmqpSession, QueueSink, Refused, Request, TooLarge, Truncated,
                                    databytes, received)
from smarthost.qmqpd_server import QmqpListener
from smarthost.queue import Draft, Queue
from tests.conftest import Daemon, program, wait_files

pytestmark = pytest.mark.timeout(120)
ME = "mx.test.invalid"
ns = netstring.encode


def req(message: bytes, sender: bytes = b"a@far.example", rcpts=(b"example@" + ME.encode(),)) -> bytes:
    return ns(ns(message) + ns(sender) + b"".join(ns(r) for r in rcpts))


def command(script: str, module: str) -> list[str]:
    """The console script if installed, else the module (before pyproject lists it)."""
    path = program(script)
    return [path] if os.path.exists(path) else [sys.executable, "-m", module]


def drive(data: bytes, step: int | None = None, **kw):
    """Feed `data` whole or `step` bytes at a time, all of it (bytes after the request land in unused)."""
    out: list[bytes] = []
    s = QmqpSession(out.append, **kw)
    ev = NEED_DATA
    step = step or max(len(data), 1)
    for i in range(0, len(data), step):
        ev = s.feed(data[i:i + step])
    return ev, b"".join(out), s


def queued(root) -> tuple[list[int], list[int]]:
    q = Queue(root.queue_dir)
    return q.mess_ids(), q.todo_ids()


# -- the session, no I/O ---------------------------------------------------------

@pytest.mark.parametrize("step", [None, 1, 2, 7])
def test_request_in_any_chunking_leaves_trailing_bytes_unread(step):
    data = req(b"Subject: x\n\nbody\n", b"s@x", [b"r1@y", b"r2@z"]) + b"NEXT"
    ev, message, s = drive(data, step)
    assert ev == Request(b"s@x", (b"r1@y", b"r2@z"), 17)
    assert message == b"Subject: x\n\nbody\n"
    assert s.done and s.unused == b"NEXT"
    assert s.feed(b"more") == ev and s.unused == b"NEXTmore"  # nothing after the request is parsed


def test_message_is_streamed_not_held():
    pieces: list[int] = []
    s = QmqpSession(lambda b: pieces.append(len(b)))
    body = b"x" * 1_000_000
    data = req(body)
    for i in range(0, len(data), 65536):
        s.feed(data[i:i + 65536])
    assert sum(pieces) == len(body) and max(pieces) <= 65536


def test_empty_message_and_empty_sender():
    assert drive(req(b"", b""))[0] == Request(b"", (b"example@" + ME.encode(),), 0)


@pytest.mark.parametrize("sender,rcpts,answer", [
    (b"a@b", [], NO_RECIPIENTS),
    (b"x" * 1000, [b"r@y"], BAD_ADDRESS),
    (b"a@b", [b"r@y", b"x" * 5000], BAD_ADDRESS),
    (b"a\0b", [b"r@y"], BAD_ADDRESS),
    (b"a@b", [b"r@y\nBcc: evil@z"], BAD_ADDRESS),
    (b"a@b", [b"r@y\r"], BAD_ADDRESS),
])
def test_refused_requests_are_read_to_the_end_first(sender, rcpts, answer):
    data = req(b"msg", sender, rcpts)
    ev, _, s = drive(data[:-1])
    assert ev is NEED_DATA  # never answered before the last byte
    assert s.feed(data[-1:]) == Refused(answer)


def test_address_of_999_bytes_is_fine():
    assert isinstance(drive(req(b"m", b"s" * 999, [b"r" * 999]))[0], Request)


def test_databytes_drains_then_refuses_without_streaming():
    data = req(b"y" * 5000)
    ev, message, s = drive(data + b"T", 100, databytes=1000)
    assert ev == Refused(TOO_BIG) and message == b"" and s.unused == b"T"
    assert isinstance(drive(data, databytes=len(data))[0], Request)


@pytest.mark.parametrize("data,error", [
    (b"999999999:", TooLarge),                      # huge declared length
    (b"200000001:", TooLarge),
    (b"12345678901", TooLarge),                     # more than 9 digits
    (b"1x:", QmqpError),                            # non-digits
    (b" 5:", QmqpError),
    (b"05:", QmqpError),                            # leading zero (qmail-qmqpd takes it)
    (b":,", QmqpError),                             # empty length
    (b"0:,", QmqpError),                            # no message, no sender
    (req(b"m")[:-1] + b";", QmqpError),             # outer comma missing
    (ns(b"1:m;1:s,1:r,"), QmqpError),               # inner comma missing
    (ns(ns(b"m")), QmqpError),                      # no sender
    (ns(ns(b"m") + ns(b"s") + b"9:r,"), QmqpError),  # recipient runs past the request
    (ns(ns(b"m") + b"1:s,x"), QmqpError),           # junk where a recipient should be
])
def test_protocol_errors(data, error):
    for step in (None, 1):
        with pytest.raises(error):
            drive(data, step)


def test_overrun_is_found_from_the_length_before_the_data():
    s = QmqpSession(lambda b: None)
    with pytest.raises(QmqpError):
        s.feed(b"100:98:")  # 98 bytes and a comma cannot fit in the 97 left
    with pytest.raises(QmqpError):
        s.feed(b"more")     # the error sticks


def test_truncated_request_is_its_own_error():
    ev, _, s = drive(req(b"body")[:-3])
    assert ev is NEED_DATA
    with pytest.raises(Truncated):
        s.feed_eof()
    assert Truncated.exit_code == 0 and TooLarge.exit_code == 111 and QmqpError.exit_code == 100


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80) | st.builds(lambda b, cut: req(b)[:cut] + b[:3], st.binary(max_size=20),
                                          st.integers(0, 60)),
       st.integers(1, 9), st.integers(0, 100))
def test_any_bytes_complete_need_more_or_protocol_error(data, step, databytes):
    try:
        ev, _, s = drive(data, step, databytes=databytes)
        if ev is NEED_DATA:
            s.feed_eof()
    except QmqpError:
        return
    assert isinstance(ev, (Request, Refused))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=50), st.lists(st.binary(min_size=1, max_size=40), min_size=1,
                                                                   max_size=4),
       st.binary(max_size=10), st.integers(1, 50))
def test_valid_requests_round_trip(message, sender, rcpts, trailing, step):
    ev, got, s = drive(req(message, sender, rcpts) + trailing, step)
    bad = any(b in a for a in [sender, *rcpts] for b in (b"\0", b"\n", b"\r"))
    assert ev == (Refused(BAD_ADDRESS) if bad else Request(sender, tuple(rcpts), len(message)))
    assert got == message and s.unused == trailing


def test_memory_stays_flat_for_50mb_and_for_huge_declared_lengths():
    chunk = b"z" * 65536
    size = 50 * 1024 * 1024
    s = QmqpSession(lambda b: None)
    tracemalloc.start()
    try:
        tail = b",5:a@b.c,85:" + b"r" * 85 + b","
        s.feed(netstring.header(len(netstring.header(size)) + size + len(tail)) + netstring.header(size))
        for _ in range(size // len(chunk)):
            s.feed(chunk)
        assert s.feed(tail + b",") == Request(b"a@b.c", (b"r" * 85,), size)
        with pytest.raises(QmqpError):
            QmqpSession(lambda b: None).feed(b"199999999:199999990:" + chunk + b",")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_databytes_is_read_like_qmail_smtpd():
    assert [databytes(v) for v in ("5000", " 12k", "x", "", None)] == [5000, 12, 0, 0, 0]


@given(st.binary(max_size=200))
def test_received_and_log_cleaning_map_every_byte(data):
    from smarthost.qmqp_session import safe
    from smarthost.qmqpd_server import clean
    allowed = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.@%+/=:-"
    assert safe(data) == "".join(chr(b) if b in allowed else "?" for b in data)
    assert clean(data) == "".join(chr(b) if 32 <= b < 127 else "_" for b in data)
    assert safe(data.decode("latin-1")) == safe(data.decode("latin-1").encode("utf-8"))


def test_received_line_is_qmails():
    line = received("QMQP", "mx.test.invalid", "192.0.2.7", "bad host<>", "joe", when=0)
    assert line == (b"Received: from bad?host?? (joe@192.0.2.7)\n"
                    b"  by mx.test.invalid with QMQP; 1 Jan 1970 00:00:00 -0000\n")
    assert received("QMQP", None, None, None, when=0).startswith(b"Received: from unknown (unknown)\n  by unknown ")


def test_queue_sink_commits_discards_and_reports_queue_trouble(root, tmp_path):
    q = Queue(root.queue_dir)
    sink = QueueSink(q.draft, b"Received: test\n")
    sink.write(b"body\n")
    assert sink.finish(Request(b"a@b", (b"c@d",), 5)).startswith("Kok ")
    [n] = q.todo_ids()
    assert open(q.mess(n), "rb").read() == b"Received: test\nbody\n"
    sink = QueueSink(q.draft)
    sink.write(b"x")
    assert sink.finish(Refused(BAD_ADDRESS)) == BAD_ADDRESS
    broken = QueueSink(Queue(str(tmp_path / "no-queue")).draft)
    broken.write(b"x")
    assert broken.finish(Request(b"", (b"c@d",), 1)) == "Zqq trouble creating files in queue (#4.3.0)"
    assert q.todo_ids() == [n] and len(q.mess_ids()) == 1


# -- qmail-qmqpd under tcpserver's conventions (stdin/stdout) ------------------------

def qmqpd(root, data: bytes, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("TCP")}
    e.update(SMARTHOST_ROOT=root.path, **env)
    return subprocess.run(command("qmail-qmqpd", "smarthost.cli.qmail_qmqpd"), input=data,
                          capture_output=True, env=e, timeout=60)


def test_stdio_qmqpd_queues_with_qmails_received_line(root):
    p = qmqpd(root, req(b"Subject: hi\n\nhello\n"), TCPREMOTEIP="192.0.2.7", TCPREMOTEHOST="ws.example",
              TCPREMOTEINFO="joe", TCPLOCALHOST=ME, TCPLOCALIP="192.0.2.1")
    assert p.returncode == 0 and p.stderr == b""
    assert re.fullmatch(rb"\d+:Kok \d+ qp \d+,", p.stdout)
    [n] = Queue(root.queue_dir).todo_ids()
    data = open(Queue(root.queue_dir).mess(n), "rb").read()
    assert re.fullmatch(rb"Received: \(qmail \d+ invoked from network\); [^\n]+\n"
                        rb"Received: from ws.example \(joe@192.0.2.7\)\n  by mx.test.invalid with QMQP; "
                        rb"\d+ \w{3} \d{4} \d\d:\d\d:\d\d -0000\nSubject: hi\n\nhello\n", data)


def test_stdio_qmqpd_without_tcp_variables_says_unknown(root):
    p = qmqpd(root, req(b"x\n"))
    assert re.fullmatch(rb"\d+:Kok \d+ qp \d+,", p.stdout)
    [n] = Queue(root.queue_dir).todo_ids()
    assert b"Received: from unknown (unknown)\n  by unknown with QMQP" in open(Queue(root.queue_dir).mess(n), "rb").read()


@pytest.mark.parametrize("data,code,out", [
    (b"1x:", 100, b""),
    (req(b"m")[:-1] + b";", 100, b""),
    (b"999999999:", 111, b""),
    (req(b"message body")[:-5], 0, b""),                # the client gave up
    (req(b"m", b"a@b", []), 0, netstring.encode(NO_RECIPIENTS.encode())),
    (req(b"m", b"a\0b"), 0, netstring.encode(BAD_ADDRESS.encode())),
])
def test_stdio_qmqpd_bad_input(root, data, code, out):
    p = qmqpd(root, data)
    assert (p.returncode, p.stdout, p.stderr) == (code, out, b"")
    assert queued(root) == ([], [])


def test_stdio_qmqpd_honours_databytes(root):
    p = qmqpd(root, req(b"x" * 500), DATABYTES="100")
    assert p.stdout == netstring.encode(TOO_BIG.encode()) and queued(root) == ([], [])


def test_under_real_tcpserver_with_our_tcprules(root, tmp_path):
    if not shutil.which("tcpserver"):
        pytest.skip("tcpserver not installed (Debian package ucspi-tcp)")
    cdb = str(tmp_path / "rules.cdb")
    tcprules.compile_rules([b'127.0.0.1:allow,DATABYTES="200"\n', b":deny\n"], cdb)
    env = dict(os.environ, SMARTHOST_ROOT=root.path)
    srv = subprocess.Popen(["tcpserver", "-1", "-H", "-R", "-l", ME, "-x", cdb, "127.0.0.1", "0",
                            *command("qmail-qmqpd", "smarthost.cli.qmail_qmqpd")],
                           stdout=subprocess.PIPE, env=env, text=True)
    try:
        port = int(srv.stdout.readline())
        assert client("127.0.0.1", port, req(b"small\n")).startswith(b"Kok ")
        assert client("127.0.0.1", port, req(b"x" * 300)) == TOO_BIG.encode()  # DATABYTES from the rule
        assert client("127.0.0.1", port, req(b"x"), source="127.0.0.2") is None  # :deny
    finally:
        srv.terminate()
        srv.wait(10)
    [n] = Queue(root.queue_dir).todo_ids()
    assert b"Received: from unknown (127.0.0.1)\n  by " + ME.encode() + b" with QMQP" in \
        open(Queue(root.queue_dir).mess(n), "rb").read()


def client(host, port, data, source=None, timeout=30.0):
    """Send a request, read the answer netstring's text (None if the server closed without one)."""
    with socket.create_connection((host, port), timeout, (source, 0) if source else None) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    return netstring.read(io.BytesIO(got), 10000) if got else None


# -- the daemon's listener, in this process, on real sockets ---------------------------

async def talk(port, data: bytes, source=None, host="127.0.0.1", hold: float = 0.0, timeout=20.0):
    """A client: send, optionally keep the connection open `hold` seconds, read to EOF."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0) if source else None)
    try:
        writer.write(data)
        await writer.drain()
        if hold:
            await asyncio.sleep(hold)
            writer.write_eof()  # and give up
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def listen(root, coro_fn, host="127.0.0.1", **kw):
    """Run `coro_fn(listener)` against a started listener; return its log lines too."""
    lines: list[str] = []

    async def main():
        lst = QmqpListener(root, host, 0, log=lines.append, **kw)
        await lst.start()
        try:
            return await coro_fn(lst)
        finally:
            await lst.wait_closed(1)

    return evloop.run(main()), lines


def k(answer: bytes) -> bool:
    return re.fullmatch(rb"\d+:Kok \d+ qp \d+,", answer) is not None


def test_listener_queues_with_received_line_and_logs(root):
    got, lines = listen(root, lambda lst: talk(lst.port, req(b"Subject: t\n\nbody\n")))
    assert k(got)
    [n] = Queue(root.queue_dir).todo_ids()
    data = open(Queue(root.queue_dir).mess(n), "rb").read()
    assert re.match(rb"Received: \(qmail \d+ invoked from network\); .*\nReceived: from unknown \(127.0.0.1\)\n"
                    rb"  by mx.test.invalid with QMQP; .*\nSubject: t\n\nbody\n$", data)
    assert lines == [f"qmqpd: ok 127.0.0.1 msg {n} bytes 17 from <a@far.example> rcpts 1"]


@pytest.mark.parametrize("inline_alone", [True, False])
def test_a_lone_session_writes_the_queue_itself_unless_its_loop_has_other_work(root, monkeypatch, inline_alone):
    """Alone in its process a session needs no worker thread; in the scheduler's process
    (inline_alone off) the queue's fsyncs always run in the disk thread, so the loop never waits."""
    import threading

    threads = []
    real = Draft.link

    def link(self, *a, **kw):
        threads.append(threading.current_thread() is threading.main_thread())
        return real(self, *a, **kw)

    monkeypatch.setattr(Draft, "link", link)

    async def one(lst):
        lst.inline_alone = inline_alone
        return await talk(lst.port, req(b"Subject: where\n\nx\n"))

    got, _ = listen(root, one)
    assert k(got)
    assert threads == [inline_alone]


def test_sessions_finishing_together_are_committed_together(root, monkeypatch):
    """A disk thread takes every session that finished while it was busy as one group;
    each client still gets its own answer, once its own message is queued."""
    from smarthost import committer

    groups: list[int] = []
    real = committer.commit_group

    def slow_first(drafts, *each):
        groups.append(len(drafts))
        if len(groups) <= committer.THREADS:
            time.sleep(0.5)  # every thread busy: meanwhile the other sessions finish
        return real(drafts, *each)


    monkeypatch.setattr(committer, "commit_group", slow_first)

    async def many(lst):
        lst.inline_alone = False
        first = [asyncio.create_task(talk(lst.port, req(b"Subject: %d\n\nx\n" % i)))
                 for i in range(committer.THREADS)]
        await asyncio.sleep(0.2)
        rest = [talk(lst.port, req(b"Subject: %d\n\nx\n" % i)) for i in range(committer.THREADS, 8)]
        return list(await asyncio.gather(*first, *rest))

    answers, lines = listen(root, many)
    assert all(k(a) for a in answers)
    assert max(groups) > 1 and sum(groups) == 8
    q = Queue(root.queue_dir)
    subjects = sorted(open(q.mess(n), "rb").read().split(b"Subject: ")[1][:1] for n in q.todo_ids())
    assert subjects == [b"%d" % i for i in range(8)]
    assert len([x for x in lines if x.startswith("qmqpd: ok ")]) == 8


def test_sessions_finished_in_one_turn_of_the_loop_are_handed_over_at_once(root, monkeypatch):
    """One hand-over, so one wake-up of a disk thread, for every session that finished
    during a turn of the loop; each still gets its own answer."""
    from smarthost import committer

    groups: list[int] = []
    real = committer.commit_group

    def record(drafts, *each):
        groups.append(len(drafts))
        return real(drafts, *each)

    puts: list = []

    class Jobs(queue.SimpleQueue):
        def put(self, item, *args):
            puts.append(item)
            super().put(item, *args)

    monkeypatch.setattr(committer, "commit_group", record)
    monkeypatch.setattr(committer._queue, "SimpleQueue", Jobs)
    q = Queue(root.queue_dir)

    async def main():
        c = committer.Committer(asyncio.get_running_loop())
        futures = []
        for i in range(5):  # all in this one turn
            sink = QueueSink(q.draft, b"Received: test\n")
            futures.append(c.finish(sink, [b"Subject: %d\n\nx\n" % i], Request(b"a@b", (b"c@d",), 5)))
        assert puts == []  # not before the turn ends
        answers = await asyncio.gather(*futures)
        c.close()
        return answers

    answers = evloop.run(main())
    assert all(a.startswith("Kok ") for a in answers)
    assert [len(p) for p in puts if isinstance(p, list)] == [5] and groups == [5]  # not the fsync pool's
    assert len(q.todo_ids()) == 5


@pytest.mark.parametrize("aio", [True, False], ids=["aio", "threads"])
def test_the_fsyncs_of_a_group_wait_side_by_side(root, monkeypatch, aio):
    """Concurrent fsyncs share the disk's cache flushes: a group's messages are synced
    at once, not one after another (by Linux AIO, one submission for the group;
    elsewhere in the committer's fsync threads), and each still gets its own answer."""
    import threading

    from smarthost import aiofsync, committer

    submitted: list[int] = []
    if aio:
        probe = os.open(root.queue_dir, os.O_RDONLY)
        try:
            if aiofsync.fsync_all([probe]) is None:
                pytest.skip("no AIO fsync here")
        finally:
            os.close(probe)
        real_all = aiofsync.fsync_all

        def fsync_all(fds):
            got = real_all(fds)
            if got is not None:
                submitted.append(len(fds))
            return got
        monkeypatch.setattr(aiofsync, "fsync_all", fsync_all)
    else:
        monkeypatch.setattr(aiofsync, "fsync_all", lambda fds: None)
    lock = threading.Lock()
    inflight = most = 0
    real_fsync = os.fsync

    def fsync(fd):
        nonlocal inflight, most
        with lock:
            inflight += 1
            most = max(most, inflight)
        try:
            time.sleep(0.05)
            return real_fsync(fd)
        finally:
            with lock:
                inflight -= 1

    monkeypatch.setattr(os, "fsync", fsync)
    q = Queue(root.queue_dir)

    async def main():
        c = committer.Committer(asyncio.get_running_loop())
        futures = [c.finish(QueueSink(q.draft, b"Received: test\n"), [b"Subject: %d\n\nx\n" % i],
                            Request(b"a@b", (b"c@d",), 5)) for i in range(4)]
        answers = await asyncio.gather(*futures)
        c.close()
        return answers

    answers = evloop.run(main())
    assert all(a.startswith("Kok ") for a in answers)
    if aio:
        assert submitted == [8] and most == 0   # the four messages' fsyncs, two each, in one
    else:
        assert most == 8   # the four messages' fsyncs, two each, waited together
    assert sorted(open(q.mess(n), "rb").read() for n in q.todo_ids()) == [
        b"Received: test\nSubject: %d\n\nx\n" % i for i in range(4)]


def test_a_session_that_breaks_in_a_group_breaks_alone(root, monkeypatch):
    from smarthost import committer, qmqp_session

    real_stage, real_group = qmqp_session.QueueSink.stage, committer.commit_group
    groups: list[int] = []

    def stage(self, event):
        if isinstance(event, qmqp_session.Request) and event.sender == b"boom@far.example":
            raise RuntimeError("a bug in one session")
        return real_stage(self, event)

    def slow_first(drafts, *each):
        groups.append(len(drafts))
        if len(groups) <= committer.THREADS:
            time.sleep(0.5)
        return real_group(drafts, *each)

    monkeypatch.setattr(qmqp_session.QueueSink, "stage", stage)
    monkeypatch.setattr(committer, "commit_group", slow_first)

    async def mixed(lst):
        lst.inline_alone = False
        first = [asyncio.create_task(talk(lst.port, req(b"Subject: a\n\nx\n"))) for _ in range(committer.THREADS)]
        await asyncio.sleep(0.2)
        rest = [talk(lst.port, req(b"Subject: b\n\nx\n", sender)) for sender in
                (b"a@far.example", b"boom@far.example", b"a@far.example")]
        return list(await asyncio.gather(*first, *rest))

    answers, lines = listen(root, mixed)
    assert max(groups) > 1
    assert [k(a) for a in answers] == [True] * committer.THREADS + [True, False, True]
    assert answers[committer.THREADS + 1] == b""  # no answer: the client tries again
    assert len(Queue(root.queue_dir).todo_ids()) == committer.THREADS + 2
    assert any("internal error: RuntimeError: a bug in one session" in x for x in lines)


def trigger_reader(root) -> int:
    """lock/trigger opened as the scheduler opens it, so pokes can be counted."""
    return os.open(Queue(root.queue_dir).trigger, os.O_RDONLY | os.O_NONBLOCK)


def pokes(fd: int) -> bytes:
    try:
        return os.read(fd, 100)
    except BlockingIOError:
        return b""


def test_listener_wakes_the_scheduler_for_what_it_queued_and_nothing_else(root):
    fd = trigger_reader(root)
    try:
        got, _ = listen(root, lambda lst: talk(lst.port, req(b"Subject: t\n\nbody\n")))
        assert k(got)
        assert pokes(fd) == b"%d\n" % Queue(root.queue_dir).todo_ids()[0]  # named: no listing
        got, _ = listen(root, lambda lst: talk(lst.port, req(b"m", b"a@b", [])))
        assert got == ns(NO_RECIPIENTS.encode())
        assert pokes(fd) == b""
    finally:
        os.close(fd)


def test_a_session_cancelled_during_its_commit_still_wakes_the_scheduler(root, monkeypatch):
    from smarthost import committer

    real = committer.commit_group

    def slow(drafts, *each):
        time.sleep(0.5)
        return real(drafts, *each)

    monkeypatch.setattr(committer, "commit_group", slow)
    fd = trigger_reader(root)

    async def cancel_mid_commit(lst):
        lst.inline_alone = False
        client = asyncio.create_task(talk(lst.port, req(b"Subject: c\n\nx\n")))
        await asyncio.sleep(0.25)  # the commit is under way
        for task in list(lst._sessions):
            task.cancel()
        await asyncio.sleep(0.6)
        return await client

    try:
        listen(root, cancel_mid_commit)
        [n] = Queue(root.queue_dir).todo_ids()
        assert pokes(fd) == b"%d\n" % n  # queued, so announced, answered or not
    finally:
        os.close(fd)


def test_stdio_qmqpd_wakes_the_scheduler_after_a_commit_only(root):
    fd = trigger_reader(root)
    try:
        assert k(qmqpd(root, req(b"x\n")).stdout)
        assert pokes(fd) == b"%d\n" % Queue(root.queue_dir).todo_ids()[0]
        assert qmqpd(root, req(b"m", b"a@b", [])).stdout == ns(NO_RECIPIENTS.encode())
        assert pokes(fd) == b""
    finally:
        os.close(fd)


def test_an_idle_listener_keeps_a_spare_draft_for_the_next_message(root, monkeypatch):
    """Its files exist before the client connects; the scheduler and cleanup leave it be;
    unused it goes after SPARE_IDLE, and with the listener."""
    import smarthost.qmqpd_server as server
    monkeypatch.setattr(server, "SPARE_IDLE", 0.3)
    q = Queue(root.queue_dir)
    seen = {}

    async def scenario(lst):
        [spare] = q.mess_ids()
        seen["spare"] = spare
        assert os.path.exists(q.intd(spare)) and q.todo_ids() == []
        assert q.cleanup() == [] and q.mess_ids() == [spare]  # locked: an injection under way
        got = await talk(lst.port, req(b"Subject: spare\n\nx\n"))
        assert k(got)
        assert q.todo_ids() == [spare]  # the message took the spare's number
        await asyncio.sleep(0.05)
        [again] = [n for n in q.mess_ids() if n != spare]  # and a new spare is made
        seen["again"] = again
        await asyncio.sleep(0.6)
        assert q.mess_ids() == [spare] and not os.path.exists(q.intd(again))  # unused: gone
        return got

    listen(root, scenario)
    assert q.mess_ids() == [seen["spare"]]
    assert Queue(root.queue_dir).todo_ids() == [seen["spare"]]
    data = open(q.mess(seen["spare"]), "rb").read()
    assert data.startswith(b"Received: (qmail ") and data.endswith(b"Subject: spare\n\nx\n")


def test_no_spare_where_the_loop_has_other_work_and_none_left_at_close(root):
    q = Queue(root.queue_dir)

    async def scenario(lst):
        assert len(q.mess_ids()) == 1
        lst.inline_alone = False
        lst._drop_spare()
        assert k(await talk(lst.port, req(b"x\n")))
        await asyncio.sleep(0.05)
        return len(q.mess_ids())

    assert listen(root, scenario)[0] == 1  # the message only
    q.cleanup()
    assert len(q.mess_ids()) == 1 and len(q.todo_ids()) == 1


TOO_LONG = ns(ns(b"m") + ns(b"a@b") + ns(b"x" * 1000))


@pytest.mark.parametrize("data,answer,logged", [
    (b"999999999:" + b"x" * 1000, b"", "drop 127.0.0.1: protocol error: netstring longer than"),
    (b"12x:", b"", "protocol error: netstring length has a non-digit"),
    (req(b"m")[:-1] + b"!", b"", "protocol error: request does not end with a comma"),
    (req(b"a body")[:-4], b"", "the client closed the connection before the end"),
    (req(b"m", b"a@b", []), ns(NO_RECIPIENTS.encode()), "refused 127.0.0.1 Dsorry, I need at least one"),
    (req(b"m", b"a@b", [b"c\0d"]), ns(BAD_ADDRESS.encode()), "refused 127.0.0.1 Dsorry, I can't accept"),
    (req(b"m", b"a@b\nX: y", [b"c@d"]), ns(BAD_ADDRESS.encode()), "refused"),
    (TOO_LONG, ns(BAD_ADDRESS.encode()), "refused"),
])
def test_listener_bad_input_gets_its_answer_and_queues_nothing(root, data, answer, logged):
    async def scenario(lst):
        reader, writer = await asyncio.open_connection("127.0.0.1", lst.port)
        writer.write(data)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return got

    got, lines = listen(root, scenario)
    assert got == answer
    assert len(lines) == 1 and logged in lines[0], lines
    assert queued(root) == ([], [])


def test_denied_clients_are_closed_unread_and_rules_reload_without_restart(root):
    rules, cdb = root.sub("rules", "qmqp.rules"), root.sub("rules", "qmqp.cdb")

    async def scenario(lst):
        out = [await talk(lst.port, req(b"1"), source="127.0.0.2")]   # no cdb: localhost only
        out.append(await talk(lst.port, req(b"2"), source="127.0.0.1"))
        tcprules.update(rules, cdb, b"127.0.0.2", True)
        out.append(await talk(lst.port, req(b"3"), source="127.0.0.2"))
        tcprules.update(rules, cdb, b"127.0.0.", False)
        tcprules.update(rules, cdb, b"127.0.0.1", False)
        out.append(await talk(lst.port, req(b"4"), source="127.0.0.1"))
        return out

    (a, b, c, d), lines = listen(root, scenario)
    assert a == b"" and k(b) and k(c) and d == b""
    assert [ln.split()[1] for ln in lines] == ["deny", "ok", "ok", "deny"]
    assert lines[0] == "qmqpd: deny 127.0.0.2" and lines[3] == "qmqpd: deny 127.0.0.1"
    assert len(Queue(root.queue_dir).todo_ids()) == 2


def test_rule_databytes_and_unreadable_cdb(root):
    cdb = root.sub("rules", "qmqp.cdb")
    tcprules.compile_rules([b'127.0.0.1:allow,DATABYTES="50"\n'], cdb)

    async def scenario(lst):
        refused = await talk(lst.port, req(b"x" * 100))
        with open(cdb, "wb") as f:
            f.write(b"not a cdb")
        return refused, await talk(lst.port, req(b"x"))

    (refused, dropped), lines = listen(root, scenario)
    assert refused == ns(TOO_BIG.encode()) and dropped == b""
    assert "unable to read rules/qmqp.cdb" in lines[1]
    assert queued(root) == ([], [])


def test_stalled_client_times_out_and_others_are_served(root):
    async def scenario(lst):
        stalled = asyncio.ensure_future(talk(lst.port, b"100:40:partial", timeout=10))
        await asyncio.sleep(0.1)
        served = await talk(lst.port, req(b"meanwhile"))
        t0 = time.monotonic()
        return await stalled, served, time.monotonic() - t0

    (stalled, served, waited), lines = listen(root, scenario, timeout=1)
    assert stalled == b"" and k(served) and waited < 5
    assert "qmqpd: drop 127.0.0.1: timeout" in lines and len(Queue(root.queue_dir).todo_ids()) == 1
    assert len(Queue(root.queue_dir).mess_ids()) == 1


def test_whole_session_limit_stops_a_trickling_client(root):
    async def scenario(lst):
        reader, writer = await asyncio.open_connection("127.0.0.1", lst.port)
        data = req(b"y" * 200)
        for i in range(len(data) - 1):  # a byte every 0.1 s never trips the idle timeout
            writer.write(data[i:i + 1])
            await asyncio.sleep(0.1)
            if reader.at_eof():
                break
        got = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return got

    got, lines = listen(root, scenario, timeout=5, session_timeout=1)
    assert got == b"" and lines == ["qmqpd: drop 127.0.0.1: timeout"] and queued(root) == ([], [])


def test_connections_over_the_limit_wait_and_are_all_served(root):
    async def scenario(lst):
        data = req(b"hello")
        first = [asyncio.ensure_future(talk(lst.port, data[:5], hold=1.0)) for _ in range(2)]
        await asyncio.sleep(0.2)
        third = asyncio.ensure_future(talk(lst.port, data))
        await asyncio.sleep(0.5)
        waiting = not third.done()  # both slots are taken by the slow ones
        rest = await asyncio.gather(*[talk(lst.port, data) for _ in range(20)])
        return waiting, await third, rest, await asyncio.gather(*first)

    (waiting, third, rest, first), lines = listen(root, scenario, concurrency=2, timeout=5)
    assert waiting and k(third) and all(k(r) for r in rest)
    assert first == [b"", b""]  # they closed half way: nothing queued for them
    assert len(Queue(root.queue_dir).todo_ids()) == 21


def test_limits_come_from_control_files(root):
    for name, value in (("concurrencyqmqp", "3"), ("timeoutqmqpd", "7")):
        with open(os.path.join(root.control_dir, name), "w") as f:
            f.write(value + "\n")
    lst = QmqpListener(root, "127.0.0.1", 0)
    assert (lst.concurrency, lst.timeout, lst.session_timeout) == (3, 7, 3600)
    os.unlink(os.path.join(root.control_dir, "concurrencyqmqp"))
    assert QmqpListener(root, "127.0.0.1", 0).concurrency == 40


def test_ipv6_listener(root):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not configured here")
    got, lines = listen(root, lambda lst: talk(lst.port, req(b"v6"), host="::1"), host="::1")
    assert k(got) and lines[0].startswith("qmqpd: ok ::1 ")
    [n] = Queue(root.queue_dir).todo_ids()
    assert b"Received: from unknown (::1)\n" in open(Queue(root.queue_dir).mess(n), "rb").read()


# -- `smarthost run --qmqp`, end to end ----------------------------------------------

def start_daemon(root, *listen_args, workers=None):
    extra = ["--qmqp-workers", str(workers)] if workers else []
    d = Daemon(root, [a for x in listen_args for a in ("--qmqp", x)] + extra)
    ports = []
    for i in range(len(listen_args)):
        d.wait_log(lambda s, i=i: s.startswith("qmqpd: listening on") and d.count("qmqpd: listening on") > i)
    for line in d.lines:
        if line.startswith("qmqpd: listening on"):
            ports.append(int(line.rsplit(":", 1)[1]))
    return d, ports


def vm_hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M).group(1))


def runs_uvloop(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "/uvloop/" in f.read()


@pytest.mark.parametrize("loop", ["default", "asyncio"])
def test_daemon_delivers_a_qmqp_message_to_a_maildir(root, monkeypatch, loop):
    if loop == "default":
        pytest.importorskip("uvloop", reason="uvloop is not installed: the daemon runs asyncio's loop")
    if loop == "asyncio":
        monkeypatch.setenv("SMARTHOST_EVENT_LOOP", "asyncio")
    else:
        monkeypatch.delenv("SMARTHOST_EVENT_LOOP", raising=False)
    d, [port] = start_daemon(root, "127.0.0.1:0")
    try:
        d.wait_log("status: local 0/")
        processes = [d.proc.pid, *qmqp_processes(d)]
        assert len(processes) >= 2
        answer = client("127.0.0.1", port, req(b"Subject: e2e\n\nover QMQP\n", b"s@far.example"))
        assert answer.startswith(b"Kok ")
        [path] = wait_files(root.sub("home", "example", "Maildir", "new"))
        data = open(path, "rb").read()
        assert data.startswith(b"Return-Path: <s@far.example>\nDelivered-To: example@mx.test.invalid\n")
        assert b"Received: from unknown (127.0.0.1)\n  by mx.test.invalid with QMQP; " in data
        assert data.endswith(b"Subject: e2e\n\nover QMQP\n")
        d.wait_log("qmqpd: ok 127.0.0.1 msg ")
        assert client("127.0.0.1", port, b"5x:", timeout=10) is None
        d.wait_log("qmqpd: drop 127.0.0.1: protocol error")
        # every process has served by now, or at least has had the time to start its loop
        assert [runs_uvloop(pid) for pid in processes] == [loop == "default"] * len(processes)
    finally:
        assert d.stop() == 0
    assert "status: exiting" in d.lines[-1]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 2).close()


def test_daemon_reuses_queue_files_and_delivers_every_message_once(root):
    """Messages in a stream through the whole server: finished messages' files are
    reused (numbers come back), and every message lands once, with its own contents."""
    from concurrent.futures import ThreadPoolExecutor

    d, [port] = start_daemon(root, "127.0.0.1:0")
    count = 240
    try:
        d.wait_log("status: local 0/")
        d.signal(signal.SIGIO)  # as a lease broken while a finished message is checked

        def send(i):
            return client("127.0.0.1", port, req(b"Subject: %d\n\nbody %d\n" % (i, i) + b"x" * (i * 37)))
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(send, range(count)))
        bad = [(i, a) for i, a in enumerate(answers) if not (a and a.startswith(b"Kok "))]
        assert not bad, (bad, [x for x in d.lines if not x.startswith(("new msg", "info msg", "delivery", "end msg", "status", "starting", "qmqpd: ok"))][-20:])
        new = root.sub("home", "example", "Maildir", "new")
        paths = wait_files(new, count, timeout=60)
        time.sleep(0.3)
        assert len(os.listdir(new)) == count  # none twice
        seen = sorted(re.search(rb"\nSubject: (\d+)\n\nbody \1\n(x*)$", open(p, "rb").read()).groups()
                      for p in paths)
        assert sorted((b"%d" % i, b"x" * (i * 37)) for i in range(count)) == seen
        d.wait_log(lambda s: d.count("end msg") == count)
    finally:
        assert d.stop() == 0
    numbers = [line.split()[2] for line in d.lines if line.startswith("new msg ")]
    assert len(numbers) == count and len(set(numbers)) < count  # numbers came back
    q = Queue(root.queue_dir)
    assert q.mess_ids() == [] and q.todo_ids() == [] and os.listdir(q.sub("intd")) == []
    assert os.listdir(q.sub("spare"))


def qmqp_processes(d) -> list[int]:
    """The daemon's QMQP processes: its children that run `smarthost run` too."""
    out = subprocess.run(["pgrep", "-P", str(d.proc.pid), "-f", "smarthost run"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def test_daemon_memory_stays_flat_for_a_50mb_message(root):
    # one QMQP process, so every session below is served by the process measured
    d, [port] = start_daemon(root, "127.0.0.1:0", workers=1)
    try:
        [qmqpd] = qmqp_processes(d)
        assert client("127.0.0.1", port, req(b"warm up\n")).startswith(b"Kok ")
        wait_files(root.sub("home", "example", "Maildir", "new"))
        before = vm_hwm_kb(qmqpd)
        size = 50 * 1024 * 1024
        inner_tail = ns(b"big@far.example") + ns(b"example@" + ME.encode())
        with socket.create_connection(("127.0.0.1", port), 60) as s:
            s.sendall(netstring.header(len(netstring.header(size)) + size + 1 + len(inner_tail))
                      + netstring.header(size))
            line = b"x" * 1023 + b"\n"
            block = line * 64
            for _ in range(size // len(block)):
                s.sendall(block)
            s.sendall(b"," + inner_tail + b",")
            assert s.recv(100).split(b":", 1)[1].startswith(b"Kok ")
        files = wait_files(root.sub("home", "example", "Maildir", "new"), 2, timeout=60)
        assert max(os.path.getsize(f) for f in files) > size
        grown = vm_hwm_kb(qmqpd) - before
        for junk in (b"999999999:" + b"j" * 100000, b"200000000:" + b"j" * 100000):
            assert client("127.0.0.1", port, junk) is None
        # huge declared lengths allocate nothing (a few kB of ordinary churn aside)
        assert vm_hwm_kb(qmqpd) - before <= grown + 1024
    finally:
        d.stop()
    print(f"peak RSS grew {grown} kB")
    assert grown < 20_000, f"the daemon's peak RSS grew {grown} kB"


@pytest.mark.parametrize("arg,words", [("nonsense", "is not ADDR:PORT"), ("::1:628", "[ADDR]:PORT"),
                                       ("localhost:628", "not an IP address")])
def test_daemon_refuses_a_bad_listen_address(root, arg, words):
    p = subprocess.run([program("smarthost"), "run", "--root", root.path, "--qmqp", arg],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr


def test_daemon_port_in_use_is_one_line(root):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        p = subprocess.run([program("smarthost"), "run", "--root", root.path, "--qmqp",
                            f"127.0.0.1:{busy.getsockname()[1]}"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "alert: cannot start" in p.stderr and "Traceback" not in p.stderr


def test_daemon_term_with_a_session_under_way(root):
    d, [port] = start_daemon(root, "127.0.0.1:0")
    s = socket.create_connection(("127.0.0.1", port), 30)
    try:
        s.sendall(b"100:20:half")
        time.sleep(0.3)
        d.signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        assert s.recv(100) == b""  # cut off without an answer: the client will try again
    finally:
        s.close()
        d.stop()
    assert queued(root)[1] == []


def test_worker_processes_share_the_port_and_stop_with_the_daemon(root):
    d, [port] = start_daemon(root, "127.0.0.1:0", workers=3)
    d.wait_log("status: local 0/")  # the scheduler is up: its spawner exists
    children = subprocess.run(["pgrep", "-P", str(d.proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(qmqp_processes(d)) == 3
    assert len(children) >= 4  # three QMQP processes and the delivery spawner
    for i in range(12):
        assert client("127.0.0.1", port, req(b"via a worker %d\n" % i)).startswith(b"Kok ")
    wait_files(root.sub("home", "example", "Maildir", "new"), 12)
    assert d.stop() == 0
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/status").read().find("State:\tZ") >= 0


def test_workers_survive_hup_and_alrm_sent_to_the_process_group(root):
    import signal as _signal

    d, [port] = start_daemon(root, "127.0.0.1:0", workers=2)
    try:
        workers = subprocess.run(["pgrep", "-P", str(d.proc.pid), "-f", "smarthost run"],
                                 capture_output=True, text=True).stdout.split()
        assert workers
        for pid in workers:
            os.kill(int(pid), _signal.SIGHUP)
            os.kill(int(pid), _signal.SIGALRM)
        time.sleep(0.3)
        for pid in workers:
            assert os.path.exists(f"/proc/{pid}") and "State:\tZ" not in open(f"/proc/{pid}/status").read()
        for i in range(6):
            assert client("127.0.0.1", port, req(b"after hup %d\n" % i)).startswith(b"Kok ")
    finally:
        assert d.stop() == 0


def test_the_scheduler_takes_qmqp_over_when_a_qmqp_process_is_gone(root):
    d, [port] = start_daemon(root, "127.0.0.1:0", workers=1)
    try:
        [qmqpd] = qmqp_processes(d)
        assert client("127.0.0.1", port, req(b"before\n")).startswith(b"Kok ")
        os.kill(qmqpd, signal.SIGKILL)
        d.wait_log(f"alert: QMQP process {qmqpd} is gone; the scheduler takes QMQP connections too")
        assert client("127.0.0.1", port, req(b"after\n")).startswith(b"Kok ")
        wait_files(root.sub("home", "example", "Maildir", "new"), 2)
    finally:
        assert d.stop() == 0
