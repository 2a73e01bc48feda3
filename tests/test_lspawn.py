"""Local delivery over real pipes: the spawner forks, the scheduler's side (LocalSpawner)
talks to each child. A child makes one delivery at a time, may then serve more for the
same user, and a child that dies costs only its own delivery."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from smarthost import evloop
from smarthost.spawnclient import CRASHED, IDLE, REUSE, Child, LocalSpawner
from tests.conftest import GatedFsync

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def home(root):
    h = root.sub("home", "example")
    with open(os.path.join(h, ".qmail-pid"), "w") as f:
        f.write(f"|echo $PPID >> {h}/pids\n")
    with open(os.path.join(h, ".qmail-die"), "w") as f:
        f.write("|kill -9 $PPID; sleep 5\n")
    with open(os.path.join(h, ".qmail-slow"), "w") as f:
        f.write(f"|sleep 1; echo slow >> {h}/slow\n")
    return h


@pytest.fixture
def messid(root):
    from smarthost.queue import Queue
    return Queue(root.queue_dir).inject(b"Subject: spawn\n\nx\n", "a@b.example", ["x@y.example"], trigger=False).id


def pids(home) -> list[int]:
    with open(os.path.join(home, "pids")) as f:
        return [int(line) for line in f]


def children_of(pid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                           text=True).stdout.split()]


def gone(pid: int) -> bool:
    """Dead: exited (a zombie not reaped yet) or reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Blocks the loop on purpose: the scheduler's side must not hear of it before the next delivery."""
    deadline = time.monotonic() + timeout
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gone(pid)


def run(root, scenario) -> None:
    """scenario(spawner) on the daemon's event loop, with a started spawner stopped after."""
    async def main():
        sp = LocalSpawner(root)
        await sp.start()
        try:
            await scenario(sp)
        finally:
            await sp.stop()
        assert sp.proc.returncode == 0
    evloop.run(main())


async def letter(sp: LocalSpawner, messid: int, rcpt: str) -> str:
    """One delivery, waited for: its answer's letter."""
    return (await sp.deliver(messid, "a@b.example", rcpt))[0]


def test_one_child_serves_deliveries_one_after_another(root, home, messid):
    async def scenario(sp):
        for _ in range(5):
            assert await letter(sp, messid, "example-pid@mx.test.invalid") == "K"
        seen = pids(home)
        assert len(seen) == 5 and len(set(seen)) == 1
        assert seen[0] not in (sp.proc.pid, os.getpid())   # never the spawner itself
        assert seen[0] in children_of(sp.proc.pid)
        # two at once: two children, each on one delivery
        both = await asyncio.gather(sp.deliver(messid, "a@b.example", "example-slow@mx.test.invalid"),
                                    sp.deliver(messid, "a@b.example", "example-pid@mx.test.invalid"))
        assert [r[0] for r in both] == ["K", "K"]
        assert len(set(pids(home))) == 2
    run(root, scenario)


def test_a_child_serves_at_most_reuse_deliveries_then_a_fresh_one_takes_over(root, home, messid):
    async def scenario(sp):
        assert await letter(sp, messid, "example-pid@mx.test.invalid") == "K"
        for _ in range(REUSE - 2):
            assert await letter(sp, messid, "example@mx.test.invalid") == "K"
        assert await letter(sp, messid, "example-pid@mx.test.invalid") == "K"   # its last
        assert await letter(sp, messid, "example-pid@mx.test.invalid") == "K"   # a new child's first
        first, last, fresh = pids(home)
        assert first == last != fresh
    run(root, scenario)


def test_a_child_that_dies_costs_only_its_own_delivery(root, home, messid):
    async def scenario(sp):
        assert await letter(sp, messid, "example-pid@mx.test.invalid") == "K"
        assert await sp.deliver(messid, "a@b.example", "example-die@mx.test.invalid") == (
            CRASHED[:1], CRASHED[1:])
        assert await letter(sp, messid, "example-pid@mx.test.invalid") == "K"
        first, second = pids(home)
        assert first != second   # the child that died was the one that had served before
    run(root, scenario)


def test_an_idle_child_exits_and_a_fresh_one_takes_over(root, home, messid):
    async def scenario(sp):
        assert await letter(sp, messid, "example-pid@mx.test.invalid") == "K"
        child = pids(home)[0]
        deadline = time.monotonic() + IDLE + 10
        while time.monotonic() < deadline and not gone(child):
            await asyncio.sleep(0.1)
        assert gone(child), "the idle child is still there"
        assert await letter(sp, messid, "example-pid@mx.test.invalid") == "K"
        assert pids(home)[1] != child
        assert not sp.idle or all(c.served == 1 for idle in sp.idle.values() for c in idle)
    run(root, scenario)


def test_a_child_killed_while_idle_costs_nothing(root, home, messid):
    async def scenario(sp):
        assert await letter(sp, messid, "example-pid@mx.test.invalid") == "K"
        child = pids(home)[0]
        os.kill(child, signal.SIGKILL)
        wait_gone(child)   # the request below finds its pipe broken
        assert await letter(sp, messid, "example-pid@mx.test.invalid") == "K"
        assert child not in pids(home)[1:]
        assert sp.proc.returncode is None
    run(root, scenario)


def test_a_killed_spawner_costs_no_delivery_and_a_new_one_forks_the_next_child(root, home, messid):
    async def scenario(sp):
        first = sp.proc.pid
        slow = asyncio.ensure_future(sp.deliver(messid, "a@b.example", "example-slow@mx.test.invalid"))
        deadline = time.monotonic() + 10
        while not children_of(first) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        os.kill(first, signal.SIGKILL)
        assert (await slow)[0] == "K"   # its child went on
        both = await asyncio.gather(sp.deliver(messid, "a@b.example", "example-slow@mx.test.invalid"),
                                    sp.deliver(messid, "a@b.example", "example-pid@mx.test.invalid"))
        assert [r[0] for r in both] == ["K", "K"]
        assert sp.proc.pid != first and pids(home)[0] in children_of(sp.proc.pid)
        with open(os.path.join(home, "slow")) as f:
            assert f.read() == "slow\nslow\n"
    run(root, scenario)


def test_stopping_lets_deliveries_under_way_finish(root, home, messid):
    async def scenario(sp):
        slow = asyncio.ensure_future(sp.deliver(messid, "a@b.example", "example-slow@mx.test.invalid"))
        await asyncio.sleep(0.2)
        await sp.stop()
        assert sp.proc.returncode == 0
        assert (await slow)[0] == "K"
        with open(os.path.join(home, "slow")) as f:
            assert f.read() == "slow\n"
        assert not sp.children   # the child that finished has been retired
    run(root, scenario)


def sig_ignored(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        mask = int(re.search(r"^SigIgn:\s+([0-9a-f]+)$", f.read(), re.M).group(1), 16)
    return bool(mask >> (sig - 1) & 1)


def test_a_delivery_child_can_be_killed_by_its_alarm_whatever_the_spawner_inherited(root, home, messid):
    """qmail-local's DEATH alarm: a hung delivery must die of SIGALRM, even when the
    scheduler was started with it ignored."""
    async def scenario(sp):
        assert sig_ignored(sp.proc.pid, signal.SIGALRM)   # the spawner itself does not care
        slow = asyncio.ensure_future(sp.deliver(messid, "a@b.example", "example-slow@mx.test.invalid"))
        deadline = time.monotonic() + 10
        children = []
        while not children and time.monotonic() < deadline:
            children = children_of(sp.proc.pid)
            await asyncio.sleep(0.01)
        [child] = children
        assert not sig_ignored(child, signal.SIGALRM)
        os.kill(child, signal.SIGALRM)   # what alarm(DEATH) sends
        assert await slow == (CRASHED[:1], CRASHED[1:])

    old = signal.signal(signal.SIGALRM, signal.SIG_IGN)  # inherited across exec
    try:
        run(root, scenario)
    finally:
        signal.signal(signal.SIGALRM, old)


def wired_child(root) -> tuple[LocalSpawner, Child, socket.socket]:
    """A LocalSpawner reading a fake child's reports, and the child's end of the socket."""
    sp = LocalSpawner(root)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    child = Child(ours, None)
    sp.children.add(child)
    asyncio.get_running_loop().add_reader(ours.fileno(), sp._readable, child)
    return sp, child, theirs


@pytest.mark.parametrize("garbage", [b"x", b"x\0ok", b"0\0" + b"y" * 20000, b"", b"0\0ok"],
                         ids=["no-nul", "non-digit", "too-long", "empty", "no-delivery-asked"])
def test_a_child_that_breaks_the_report_protocol_gets_no_more_work(root, garbage):
    """A report is one bounded datagram `CODE NUL TEXT`: garbage, a report too long or
    one nobody asked for ends the scheduler's dealings with the child (its socket
    closes, so it exits), and a delivery it was on is reported as crashed."""
    async def scenario():
        loop = asyncio.get_running_loop()
        sp, child, theirs = wired_child(root)
        ours = child.sock
        asked = garbage != b"0\0ok"
        fut = child.fut = loop.create_future() if asked else None
        try:
            theirs.send(garbage)
            deadline = time.monotonic() + 10
            while child in sp.children and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert child not in sp.children and ours.fileno() == -1
            assert theirs.recv(10) == b""   # the child sees its end of file: it exits
            if asked:
                assert fut.result() == (CRASHED, [])
        finally:
            theirs.close()
    evloop.run(scenario())


def test_a_report_with_more_descriptors_than_new_dirs_max_gets_the_child_dropped(root):
    """A report may carry NEW_DIRS_MAX new/ descriptors: one with more is cut (MSG_CTRUNC),
    so the child gets no more work, its delivery is reported crashed, and what did
    arrive is closed, not leaked."""
    from smarthost.lspawn import NEW_DIRS_MAX

    async def scenario():
        loop = asyncio.get_running_loop()
        sp, child, theirs = wired_child(root)
        ours = child.sock
        fut = child.fut = loop.create_future()
        pipes = [os.pipe() for _ in range(NEW_DIRS_MAX + 1)]
        try:
            socket.send_fds(theirs, [b"0\0did 1+0+0\n"], [r for r, _ in pipes])
            for r, _ in pipes:
                os.close(r)   # the scheduler's copies are now the only read ends
            assert await asyncio.wait_for(fut, 10) == (CRASHED, [])
            assert child not in sp.children and ours.fileno() == -1
            for _, w in pipes:   # every read end that arrived was closed
                with pytest.raises(BrokenPipeError):
                    os.write(w, b"x")
        finally:
            theirs.close()
            for _, w in pipes:
                os.close(w)
    evloop.run(scenario())


@pytest.mark.skipif(os.geteuid() != 0, reason="system mode switches to each recipient's uid: needs root")
def test_in_system_mode_a_child_serves_one_user_as_that_user(root, messid):
    """The scheduler picks an idle child by user: a child that has switched to one
    user's uid never takes another user's delivery."""
    from smarthost.users import compile_assign

    users = {"u1": 60101, "u2": 60102}
    changed = []
    path = root.path
    while path != "/":   # the users must reach their homes and the queued message
        mode = os.stat(path).st_mode & 0o7777
        if mode & 0o011 != 0o011:
            changed.append((path, mode))
            os.chmod(path, mode | 0o011)
        path = os.path.dirname(path)
    try:
        with open(root.sub("control", "mode"), "w") as f:
            f.write("system\n")
        with open(root.sub("users", "assign"), "w") as f:
            for name, uid in users.items():
                home = root.sub("home", name)
                os.makedirs(home, mode=0o755, exist_ok=True)
                with open(os.path.join(home, ".qmail"), "w") as q:
                    q.write(f"|echo $PPID $(id -u) >> {home}/who\n")
                os.chmod(os.path.join(home, ".qmail"), 0o644)
                os.chown(home, uid, uid)
                f.write(f"={name}:{name}:{uid}:{uid}:{home}:::\n")
            f.write(".\n")
        compile_assign(root.sub("users", "assign"), root.sub("users", "cdb"))

        async def scenario(sp):
            for name in ("u1", "u2", "u1", "u2", "u1"):
                got = await sp.deliver(messid, "a@b.example", f"{name}@mx.test.invalid")
                assert got == ("K", "did 0+0+1\n"), got
        run(root, scenario)

        seen = {}
        for name, uid in users.items():
            with open(root.sub("home", name, "who")) as f:
                lines = [line.split() for line in f]
            assert {int(u) for _, u in lines} == {uid}
            seen[name] = {int(p) for p, _ in lines}
            assert len(seen[name]) == 1   # one child served each user's deliveries
        assert not seen["u1"] & seen["u2"]
    finally:
        for path, mode in changed:
            os.chmod(path, mode)


@pytest.mark.parametrize("script", ["exec sleep 60", "printf x >&0; exec sleep 60", "exit 0"],
                         ids=["silent", "wrong-hello", "dies-at-once"])
def test_a_spawner_that_does_not_start_is_killed_and_the_delivery_deferred(root, messid, tmp_path,
                                                                          monkeypatch, script):
    """A spawner must say `+` within START_TIMEOUT; otherwise it is killed, and
    deliver() raises (run_delivery defers the delivery) instead of waiting for ever."""
    from smarthost import spawnclient

    fake = tmp_path / "fake-python"
    pidfile = tmp_path / "pid"
    fake.write_text(f"#!/bin/sh\necho $$ > {pidfile}\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(spawnclient, "START_TIMEOUT", 1.0)
    monkeypatch.setattr(spawnclient.sys, "executable", str(fake))

    async def scenario():
        sp = LocalSpawner(root)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="spawner"):
            await sp.deliver(messid, "a@b.example", "example@mx.test.invalid")
        assert time.monotonic() - started < 10
        assert not sp.alive and sp.proc is None and sp.sock is None
    evloop.run(scenario())
    assert gone(int(pidfile.read_text()))   # killed, and reaped


class RawSpawner:
    """smarthost.lspawn over its socket, driven by hand: what the scheduler's side never sends."""

    def __init__(self, root):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, "-m", "smarthost.lspawn", root.path], stdin=theirs)
        theirs.close()
        self.sock.settimeout(20)
        assert self.sock.recv(1) == b"+"

    def send(self, data: bytes, fds: list[int]) -> None:
        socket.send_fds(self.sock, [data], fds)

    def child(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.send(b"F", [theirs.fileno()])
        theirs.close()
        ours.settimeout(20)
        return ours

    def close(self) -> int:
        self.sock.close()
        return self.proc.wait(20)


def test_the_spawner_forks_only_for_one_socket_sent_with_f(root):
    """Anything but `F` with exactly one descriptor forks nothing; the descriptors
    are closed (their far ends see end of file) and the spawner goes on."""
    sp = RawSpawner(root)
    try:
        for data, count in ((b"X", 1), (b"F", 0), (b"F", 2), (b"FF", 1)):
            pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(count)]
            sp.send(data, [theirs.fileno() for _, theirs in pairs])
            for ours, theirs in pairs:
                theirs.close()
                ours.settimeout(20)
                assert ours.recv(10) == b""   # nobody holds the other end
                ours.close()
        assert children_of(sp.proc.pid) == []
        chan = sp.child()   # still serving
        chan.close()
    finally:
        assert sp.close() == 0


def test_a_child_answers_a_mangled_request_and_serves_on(root, home, messid):
    """A request is `MESSID NUL SENDER NUL RECIPIENT`, at most REQUEST_MAX bytes, with at
    most one descriptor: anything else gets qmail-local's temporary failure, not a crash;
    and a child whose scheduler closes its end exits."""
    from smarthost.lspawn import REQUEST_MAX

    sp = RawSpawner(root)
    try:
        chan = sp.child()
        spare = [socket.socketpair() for _ in range(2)]
        mangled = [(b"garbage", []), (b"x\0a@b.example\0example@mx.test.invalid", []),
                   (b"%d\0a@b.example" % messid, []), (b"%d\0a@b.example\0" % messid + b"e" * REQUEST_MAX, []),
                   (b"%d\0a@b.example\0example@mx.test.invalid" % messid, [s.fileno() for s, _ in spare])]
        for data, fds in mangled:
            socket.send_fds(chan, [data], fds) if fds else chan.send(data)
            assert chan.recv(20000) == b"111\0Delivery request mangled. (#4.3.0)"
        for sent, theirs in spare:   # the child closed what it was sent
            sent.close()
            theirs.settimeout(20)
            assert theirs.recv(10) == b""
        chan.send(b"%d\0a@b.example\0example-pid@mx.test.invalid" % messid)
        assert chan.recv(20000).startswith(b"0\0did 0+0+1\n")
        [child] = pids(home)
        chan.close()
        wait_gone(child)
    finally:
        assert sp.close() == 0


def test_a_child_hands_the_new_directories_it_linked_into_to_the_scheduler(root, home, messid):
    """A report carries the descriptor of each new/ a message was linked into, up to
    NEW_DIRS_MAX; the child fsyncs any beyond that itself. Each maildir line delivered."""
    from miniqmail import maildir
    from smarthost.lspawn import NEW_DIRS_MAX, fds_in, receive

    boxes = [f"M{i}" for i in range(NEW_DIRS_MAX + 1)]
    for box in boxes:
        maildir.make(os.path.join(home, box))
    with open(os.path.join(home, ".qmail-two"), "w") as f:
        f.write("./M0/\n./M1/\n")
    with open(os.path.join(home, ".qmail-many"), "w") as f:
        f.write("".join(f"./{box}/\n" for box in boxes))

    def new_dir(box):
        st = os.stat(os.path.join(home, box, "new"))
        return st.st_dev, st.st_ino

    sp = RawSpawner(root)
    try:
        chan = sp.child()
        for rcpt, lines in (("example-two", 2), ("example-many", len(boxes))):
            chan.send(b"%d\0a@b.example\0%s@mx.test.invalid" % (messid, rcpt.encode()))
            report, anc, flags, _ = chan.recvmsg(20000, socket.CMSG_SPACE(4 * 2 * NEW_DIRS_MAX))
            fds = fds_in(anc)
            got = []
            for fd in fds:
                st = os.fstat(fd)
                got.append((st.st_dev, st.st_ino))
                os.close(fd)
            assert report == b"0\0did %d+0+0\n" % lines
            assert not flags & socket.MSG_CTRUNC
            assert got == [new_dir(box) for box in boxes[:min(lines, NEW_DIRS_MAX)]]
        for box in boxes:   # two messages in M0 and M1, one elsewhere
            assert len(os.listdir(os.path.join(home, box, "new"))) == (2 if box in boxes[:2] else 1)
        chan.send(b"%d\0a@b.example\0example-pid@mx.test.invalid" % messid)
        report, fds, _ = receive(chan, 20000)
        assert report.startswith(b"0\0did 0+0+1\n") and fds == []   # no maildir, nothing to sync
        chan.close()
    finally:
        assert sp.close() == 0


def test_a_delivery_counts_only_once_the_scheduler_has_synced_new_once_for_many(root, home, messid,
                                                                                new_dir_fsync):
    """Six children link their messages into one new/: none is reported delivered while
    new/'s fsync is held, and one or two fsyncs (turns) cover all six."""
    fsync = new_dir_fsync
    new = os.path.join(home, "Maildir", "new")

    async def scenario(sp):
        tasks = [asyncio.ensure_future(sp.deliver(messid, "a@b.example", "example@mx.test.invalid"))
                 for _ in range(6)]
        deadline = time.monotonic() + 20
        while len(os.listdir(new)) < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert len(os.listdir(new)) == 6
        await asyncio.sleep(0.2)
        assert fsync.calls and not any(t.done() for t in tasks)
        fsync.gate.set()
        results = await asyncio.gather(*tasks)
        assert results == [("K", "did 1+0+0\n")] * 6, results
        here = os.stat(new)
        assert set(fsync.calls) == {(here.st_dev, here.st_ino)}
        assert 1 <= len(fsync.calls) <= 2
    run(root, scenario)


def test_a_delivery_whose_new_cannot_be_synced_is_deferred(root, home, messid, new_dir_fsync):
    """An fsync of new/ that fails leaves the delivery not known to be durable: Z, retried later."""
    fsync = new_dir_fsync
    fsync.gate.set()
    fsync.error = OSError(5, "Input/output error")

    async def scenario(sp):
        letter, text = await sp.deliver(messid, "a@b.example", "example@mx.test.invalid")
        assert (letter, text) == ("Z", "Unable to sync the maildir: Input/output error. (#4.3.0)")
        fsync.error = None
        assert await sp.deliver(messid, "a@b.example", "example@mx.test.invalid") == ("K", "did 1+0+0\n")
    run(root, scenario)


def test_with_aio_the_fsyncs_of_new_wake_no_thread(root, home, messid):
    """Where the kernel takes AIO fsyncs, new/ is synced without a worker thread: deliveries
    are counted with every thread pool refused, and the directory is durable after."""
    from tests.conftest import aio_fsync_works

    if not aio_fsync_works():
        pytest.skip("this kernel takes no AIO fsync from an event loop")

    class NoThreads(concurrent.futures.Executor):
        def submit(self, *args, **kwargs):
            raise RuntimeError("no thread here")

    async def scenario(sp):
        asyncio.get_running_loop().set_default_executor(NoThreads())
        results = await asyncio.gather(*(sp.deliver(messid, "a@b.example", "example@mx.test.invalid")
                                         for _ in range(3)))
        assert results == [("K", "did 1+0+0\n")] * 3
        assert sp.new_dirs.kernel is not None and not sp.new_dirs.kernel.pending
    run(root, scenario)
    assert len(os.listdir(os.path.join(home, "Maildir", "new"))) == 3


def test_without_aio_or_a_thread_new_is_not_synced_the_delivery_deferred_and_nothing_leaks(
        root, home, messid, monkeypatch):
    """Where neither AIO nor a worker thread can sync new/, the delivery is deferred (it
    is linked, but not known to be durable) and every descriptor the report carried is
    closed, once."""
    from smarthost import aiofsync

    monkeypatch.setattr(aiofsync.LoopFsyncs, "open", classmethod(lambda cls, loop: None))

    class NoThreads(concurrent.futures.Executor):
        def submit(self, *args, **kwargs):
            raise RuntimeError("no thread here")

    async def scenario(sp):
        assert await sp.deliver(messid, "a@b.example", "example@mx.test.invalid") == ("K", "did 1+0+0\n")
        before = sorted(os.listdir("/proc/self/fd"))
        asyncio.get_running_loop().set_default_executor(NoThreads())
        for _ in range(3):
            assert await sp.deliver(messid, "a@b.example", "example@mx.test.invalid") == (
                "Z", "Unable to sync the maildir: RuntimeError: no thread here. (#4.3.0)")
        assert sorted(os.listdir("/proc/self/fd")) == before
    run(root, scenario)


def test_sync_dirs_fsyncs_each_directory_once_and_closes_every_descriptor(tmp_path, monkeypatch):
    from smarthost import spawnclient

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    fsync = GatedFsync(spawnclient.maildir.fsync_dir)
    fsync.gate.set()
    monkeypatch.setattr(spawnclient.maildir, "fsync_dir", fsync)

    def fds(*dirs):
        return [os.open(d, os.O_RDONLY | os.O_DIRECTORY) for d in dirs]

    reports = [fds(a), fds(a, b), fds(b), fds(a)]
    opened = [fd for r in reports for fd in r]
    assert spawnclient.sync_dirs(reports) == [None] * 4
    assert sorted(fsync.calls) == sorted((os.stat(d).st_dev, os.stat(d).st_ino) for d in (a, b))
    for fd in opened:
        with pytest.raises(OSError):
            os.fstat(fd)

    fsync.calls.clear()
    real = fsync.real
    fsync.real = lambda fd: (_ for _ in ()).throw(OSError(5, "Input/output error")) \
        if os.fstat(fd).st_ino == os.stat(b).st_ino else real(fd)
    assert spawnclient.sync_dirs([fds(a), fds(a, b), fds(b)]) == [None, "Input/output error", "Input/output error"]
    assert len(fsync.calls) == 2
