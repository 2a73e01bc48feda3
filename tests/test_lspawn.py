"""The local delivery spawner over its real pipes: a child makes one delivery at a time,
may then serve more for the same user, and a child that dies costs only its own delivery."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.timeout(60)


class Spawner:
    def __init__(self, root):
        self.proc = subprocess.Popen([sys.executable, "-m", "smarthost.lspawn", root.path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        assert self.read(1) == b"+"
        self.buf = b""
        self.ids = 0

    def read(self, n: int, timeout: float = 20.0) -> bytes:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the spawner said nothing"
        return os.read(self.proc.stdout.fileno(), n)

    def ask(self, messid: int, rcpt: str, sender: str = "a@b.example") -> int:
        self.ids += 1
        self.proc.stdin.write(b"%d\0%d\0%s\0%s\0" % (self.ids, messid, sender.encode(), rcpt.encode()))
        return self.ids

    def answer(self) -> tuple[int, str]:
        while self.buf.count(b"\0") < 2:
            data = self.read(65536)
            assert data, "the spawner closed its end"
            self.buf += data
        did, report, self.buf = self.buf.split(b"\0", 2)
        return int(did), report.decode()

    def close(self) -> int:
        self.proc.stdin.close()
        return self.proc.wait(20)


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


def letter(sp: Spawner, d: int) -> str:
    """The answer's letter (K, Z or D), which must be for delivery `d`."""
    did, report = sp.answer()
    assert did == d
    return report[:1]


def pids(home) -> list[int]:
    with open(os.path.join(home, "pids")) as f:
        return [int(line) for line in f]


@pytest.fixture
def sp(root, home):
    spawner = Spawner(root)
    yield spawner
    assert spawner.close() == 0


def delivered(sp: Spawner, messid: int, rcpt: str) -> str:
    """One delivery, waited for: its answer's letter."""
    return letter(sp, sp.ask(messid, rcpt))


def test_one_child_serves_deliveries_one_after_another(sp, home, messid):
    for _ in range(5):
        assert delivered(sp, messid, "example-pid@mx.test.invalid") == "K"
    seen = pids(home)
    assert len(seen) == 5 and len(set(seen)) == 1
    assert seen[0] not in (sp.proc.pid, os.getpid())   # never the spawner itself
    # two at once: two children, each on one delivery
    sp.ask(messid, "example-slow@mx.test.invalid")
    sp.ask(messid, "example-pid@mx.test.invalid")
    assert sorted(sp.answer()[1][:1] for _ in range(2)) == ["K", "K"]
    assert len(set(pids(home))) == 2


def test_a_child_serves_at_most_reuse_deliveries_then_a_fresh_one_takes_over(sp, home, messid):
    from smarthost.lspawn import REUSE

    assert delivered(sp, messid, "example-pid@mx.test.invalid") == "K"
    for _ in range(REUSE - 2):
        assert delivered(sp, messid, "example@mx.test.invalid") == "K"
    assert delivered(sp, messid, "example-pid@mx.test.invalid") == "K"   # its last
    assert delivered(sp, messid, "example-pid@mx.test.invalid") == "K"   # a new child's first
    first, last, fresh = pids(home)
    assert first == last != fresh


def test_a_child_that_dies_costs_only_its_own_delivery(sp, home, messid):
    assert delivered(sp, messid, "example-pid@mx.test.invalid") == "K"
    d = sp.ask(messid, "example-die@mx.test.invalid")
    assert sp.answer() == (d, "ZDelivery process crashed. (#4.3.0)")
    assert delivered(sp, messid, "example-pid@mx.test.invalid") == "K"
    first, second = pids(home)
    assert first != second   # the child that died was the one that had served before


def test_an_idle_child_exits_and_a_fresh_one_takes_over(sp, home, messid):
    from smarthost.lspawn import IDLE

    assert delivered(sp, messid, "example-pid@mx.test.invalid") == "K"
    child = pids(home)[0]
    deadline = time.monotonic() + IDLE + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{child}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{child}"), "the idle child is still there"
    assert delivered(sp, messid, "example-pid@mx.test.invalid") == "K"
    assert pids(home)[1] != child


def gone(pid: int) -> bool:
    """Dead: exited (a zombie not reaped yet) or reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_child_killed_while_idle_costs_nothing(sp, home, messid):
    import signal

    assert delivered(sp, messid, "example-pid@mx.test.invalid") == "K"
    child = pids(home)[0]
    os.kill(sp.proc.pid, signal.SIGSTOP)  # so it sees the request before the death
    try:
        d = sp.ask(messid, "example-pid@mx.test.invalid")
        time.sleep(0.1)
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and gone(child) is False:
            time.sleep(0.01)
    finally:
        os.kill(sp.proc.pid, signal.SIGCONT)
    assert letter(sp, d) == "K"
    assert delivered(sp, messid, "example-pid@mx.test.invalid") == "K"
    assert child not in pids(home)[1:]
    assert sp.proc.poll() is None


def test_closing_the_requests_lets_deliveries_under_way_finish(root, home, messid):
    sp = Spawner(root)
    d = sp.ask(messid, "example-slow@mx.test.invalid")
    sp.proc.stdin.close()
    assert letter(sp, d) == "K"
    assert sp.proc.wait(20) == 0
    with open(os.path.join(home, "slow")) as f:
        assert f.read() == "slow\n"


def sig_ignored(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        mask = int(re.search(r"^SigIgn:\s+([0-9a-f]+)$", f.read(), re.M).group(1), 16)
    return bool(mask >> (sig - 1) & 1)


def test_a_delivery_child_can_be_killed_by_its_alarm_whatever_the_spawner_inherited(root, home, messid):
    """qmail-local's DEATH alarm: a hung delivery must die of SIGALRM, even when the
    scheduler was started with it ignored."""
    import signal

    old = signal.signal(signal.SIGALRM, signal.SIG_IGN)  # inherited across exec
    try:
        sp = Spawner(root)
    finally:
        signal.signal(signal.SIGALRM, old)
    try:
        assert sig_ignored(sp.proc.pid, signal.SIGALRM)   # the spawner itself does not care
        d = sp.ask(messid, "example-slow@mx.test.invalid")
        deadline = time.monotonic() + 10
        children = []
        while not children and time.monotonic() < deadline:
            children = subprocess.run(["pgrep", "-P", str(sp.proc.pid)], capture_output=True,
                                      text=True).stdout.split()
        [child] = children
        assert not sig_ignored(int(child), signal.SIGALRM)
        os.kill(int(child), signal.SIGALRM)   # what alarm(DEATH) sends
        assert sp.answer() == (d, "ZDelivery process crashed. (#4.3.0)")
    finally:
        assert sp.close() == 0


@pytest.mark.parametrize("garbage", [b"x:", b"99999999:", b"3:abc;", b"4:0\0ok,"],
                         ids=["non-digit", "huge-length", "no-comma", "no-delivery-asked"])
def test_a_child_that_breaks_the_report_protocol_is_stopped(garbage):
    """Reports come as bounded netstrings: garbage, a huge length or a report nobody asked
    for gets the child killed, and a delivery it was on is reported as crashed."""
    from smarthost.lspawn import Pool, Worker

    res_r, res_w = os.pipe()
    out_r, out_w = os.pipe()
    child = os.posix_spawnp("sleep", ["sleep", "30"], os.environ)  # reaped by the pool, as its own are
    pool = Pool(None, -1, out_w)
    w = Worker(child, -1, res_r, None)
    w.did = None if garbage.startswith(b"4:") else b"7"
    pool.workers[res_r] = w
    pool.sel.register(res_r, 1)
    try:
        os.write(res_w, garbage)
        pool.result(w)
        deadline = time.monotonic() + 10
        while not gone(child) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gone(child)
        os.close(res_w)
        pool.result(w)   # its end of file
        assert res_r not in pool.workers
        if w.did is not None:
            assert os.read(out_r, 100) == b"7\0ZDelivery process crashed. (#4.3.0)\0"
    finally:
        if os.path.exists(f"/proc/{child}"):
            os.kill(child, 9)
            os.waitpid(child, 0)
        os.close(out_r)
        os.close(out_w)
