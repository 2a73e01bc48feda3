#!/usr/bin/env python3
"""Benchmark the QMQP pair against Postfix, in one run.

    .venv/bin/python tests/bench/bench_qmqp.py [-m 2000] [--rounds 2] [--skip-postfix]

1. Postfix's qmqp-source (1000-byte messages) drives our `smarthost run --qmqp`
   and a private Postfix whose qmqpd delivers into a Maildir, at concurrency 1,
   10 and 50, interleaved A B A B (this machine's speed drifts). For each:
   messages/s durably accepted (qmqp-source's wall time) and messages/s end to
   end (until every file is in new/), and our/Postfix ratios.
2. qmail-qmqpc handing one 2 KB message to our server: median wall time of the
   whole process beside `python3 -c pass`.
   Before each concurrency the disk's own rate is printed: a create+write+fsync
   loop for a quarter of a second. It swings within minutes here, mostly with
   how many inodes were freed lately (ext4 without a journal skips those when
   it allocates), so read each block's ratios beside it.
3. A 50 MB message through the pair: peak RSS of qmail-qmqpc and of the server.

Needs root and Debian's postfix package for part 1's peer (`--skip-postfix` runs ours only).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, TOP)
sys.path.insert(0, HERE)

from miniqmail import envelope  # noqa: E402
from private_postfix import PrivatePostfix, available, free_port  # noqa: E402
from smarthost.init import init  # noqa: E402

BIN = os.path.dirname(sys.executable)
SOURCE = "/usr/sbin/qmqp-source"


def vm_hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else 0


class Ours:
    name = "ours"

    def __init__(self, base: str):
        self.base = base
        self.n = 0

    def start(self) -> None:
        self.n += 1
        self.root = init(os.path.join(self.base, f"root{self.n}"), me="bench.invalid")
        self.log = open(self.root.sub("bench.log"), "w+")
        self.proc = subprocess.Popen([os.path.join(BIN, "smarthost"), "run", "--root", self.root.path,
                                      "--qmqp", "127.0.0.1:0"], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, SMARTHOST_ROOT=self.root.path))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(self.log.name) as f:
                m = re.search(r"qmqpd: listening on .*:(\d+)\s*$", f.read(), re.M)
            if m:
                self.port = int(m.group(1))
                return
            time.sleep(0.02)
        raise SystemExit("our smart host did not start; see " + self.log.name)

    @property
    def rcpt(self) -> str:
        return "example@bench.invalid"

    @property
    def new(self) -> str:
        return self.root.sub("home", "example", "Maildir", "new")

    def delivered(self) -> int:
        return len(os.listdir(self.new))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


class Postfix:
    name = "postfix"

    def __init__(self, base: str):
        self.pf = PrivatePostfix(os.path.join(base, "postfix"), 0)
        self.base = base
        self.n = 0

    def start(self) -> None:
        self.n += 1
        port = free_port()
        self.pf = PrivatePostfix(os.path.join(self.base, f"postfix{self.n}"), port)
        self.pf.setup()
        try:
            self.pf.start()
        except RuntimeError as e:
            tail = open(self.pf.log).read()[-2000:] if os.path.exists(self.pf.log) else "(no log)"
            raise SystemExit(f"{e}\n{tail}") from None
        self.port = port

    @property
    def rcpt(self) -> str:
        return "bench@bench.test"

    @property
    def new(self) -> str:
        return self.pf.maildir_new

    def delivered(self) -> int:
        return self.pf.delivered()

    def stop(self) -> None:
        self.pf.stop()


def disk_rate(directory: str, seconds: float = 0.25) -> float:
    """create+write+fsync of 1000-byte files in `directory` for `seconds`; files/s (kept, not freed)."""
    os.makedirs(directory, exist_ok=True)
    block = b"x" * 1000
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fd = os.open(os.path.join(directory, str(n)), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        try:
            os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
        n += 1
    return n / (time.perf_counter() - t0)


def last_link(directory: str) -> float:
    """When the newest file in `directory` got its name there (the latest ctime: a link sets it)."""
    with os.scandir(directory) as entries:
        return max((e.stat().st_ctime for e in entries), default=0.0)


def drive(server, messages: int, concurrency: int) -> tuple[float, float]:
    server.start()
    try:
        t0 = time.perf_counter()
        wall0 = time.time()
        subprocess.run([SOURCE, "-f", "sender@bench.invalid", "-t", server.rcpt, "-l", "1000",
                        "-m", str(messages), "-s", str(concurrency), f"127.0.0.1:{server.port}"],
                       check=True, stdout=subprocess.DEVNULL)
        accepted = messages / (time.perf_counter() - t0)
        # Listing new/ costs the server CPU while it still delivers, so look rarely,
        # and take the end from the files' own link times rather than from the look.
        deadline = time.monotonic() + 600
        while server.delivered() < messages and time.monotonic() < deadline:
            time.sleep(0.05)
        e2e = server.delivered() / max(last_link(server.new) - wall0, 1e-3)
        return accepted, e2e
    finally:
        server.stop()


def client_env(base: str, name: str, port: int) -> dict[str, str]:
    """A client root under `base` whose only QMQP server is 127.0.0.1:`port`; its environment."""
    ctl = os.path.join(base, name, "control")
    os.makedirs(ctl, exist_ok=True)
    with open(os.path.join(ctl, "qmqpservers"), "w") as f:
        f.write(f"127.0.0.1:{port}\n")
    return dict(os.environ, MINIQMAIL_ROOT=os.path.join(base, name))


def handoff_times(base: str, runs: int) -> tuple[float, float]:
    ours = Ours(base)
    ours.start()
    try:
        env = client_env(base, "client", ours.port)
        msg = b"Subject: 2k\n\n" + b"y" * 2000 + b"\n"
        env_bytes = envelope.encode("a@bench.invalid", ["example@bench.invalid"])
        py = os.path.join(BIN, "python")
        client, bare = [], []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run([py, "-c", "pass"], check=True)
            bare.append(time.perf_counter() - t)
            rfd, wfd = os.pipe()
            os.write(wfd, env_bytes)
            os.close(wfd)
            t = time.perf_counter()
            code = subprocess.run([os.path.join(BIN, "qmail-qmqpc")], input=msg, stdout=rfd, env=env).returncode
            client.append(time.perf_counter() - t)
            os.close(rfd)
            assert code == 0, code
        return statistics.median(client), statistics.median(bare)
    finally:
        ours.stop()


def big_message(base: str, size: int) -> tuple[int, int]:
    ours = Ours(base)
    ours.start()
    try:
        env = client_env(base, "bigclient", ours.port)
        path = os.path.join(base, "big.msg")
        with open(path, "wb") as f:
            f.write(b"Subject: big\n\n")
            line = b"z" * 76 + b"\n"
            for _ in range(size // len(line)):
                f.write(line)
        rfd, wfd = os.pipe()
        os.write(wfd, envelope.encode("a@bench.invalid", ["example@bench.invalid"]))
        os.close(wfd)
        # fed through a pipe, so the client has to spool it rather than map the file
        with open(path, "rb") as src:
            p = subprocess.Popen([os.path.join(BIN, "qmail-qmqpc")], stdin=subprocess.PIPE, stdout=rfd,
                                 env=env)
            shutil.copyfileobj(src, p.stdin, 1 << 20)
            p.stdin.close()
            client_peak = 0
            while p.poll() is None:
                try:
                    client_peak = max(client_peak, vm_hwm_kb(p.pid))
                except OSError:
                    pass
                time.sleep(0.01)
        os.close(rfd)
        assert p.returncode == 0, p.returncode
        deadline = time.monotonic() + 120
        while ours.delivered() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = subprocess.run(["pgrep", "-P", str(ours.proc.pid), "-f", "smarthost run"],
                              capture_output=True, text=True).stdout.split()
        server_peak = max(vm_hwm_kb(int(pid)) for pid in [ours.proc.pid, *tree])  # scheduler, QMQP
        return client_peak, server_peak
    finally:
        ours.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", type=int, default=2000, help="messages per run (default 2000)")
    ap.add_argument("--rounds", type=int, default=4, help="A B rounds per concurrency (default 4)")
    ap.add_argument("--concurrency", default="1,10,50")
    ap.add_argument("--skip-postfix", action="store_true")
    ap.add_argument("--runs", type=int, default=21, help="qmail-qmqpc start-up runs (default 21)")
    ap.add_argument("--dir", default=os.path.join(TOP, "var"),
                    help="where the servers' files go (default var/ in the checkout)")
    a = ap.parse_args()
    if not os.path.exists(SOURCE):
        raise SystemExit(f"{SOURCE} is missing (Debian package postfix)")
    why = None if not a.skip_postfix else "skipped"
    if why is None:
        why = available()
    os.makedirs(a.dir, exist_ok=True)
    base = tempfile.mkdtemp(prefix="bench-qmqp-", dir=a.dir)
    os.chmod(base, 0o755)  # Postfix's own users must reach their directories below it
    try:
        servers = [Ours(base)] + ([Postfix(base)] if why is None else [])
        print(f"{a.m} messages of 1000 bytes per run, {a.rounds} interleaved rounds"
              + ("" if why is None else f"; Postfix: {why}"))
        print(f"{'conc':>4}  {'server':8} {'accepted/s':>11} {'end-to-end/s':>13}")
        for conc in [int(c) for c in a.concurrency.split(",")]:
            disk = disk_rate(os.path.join(base, f"disk{conc}"))
            print(f"{conc:>4}  (disk: {disk:.0f} create+write+fsync/s)")
            results: dict[str, list[tuple[float, float]]] = {s.name: [] for s in servers}
            for _ in range(a.rounds):
                for s in servers:
                    results[s.name].append(drive(s, a.m, conc))
            for name, rs in results.items():
                acc = statistics.mean(r[0] for r in rs)
                e2e = statistics.mean(r[1] for r in rs)
                print(f"{conc:>4}  {name:8} {acc:11.0f} {e2e:13.0f}")
            if "postfix" in results:
                ours_acc = statistics.mean(r[0] for r in results["ours"])
                ours_e2e = statistics.mean(r[1] for r in results["ours"])
                pf_acc = statistics.mean(r[0] for r in results["postfix"])
                pf_e2e = statistics.mean(r[1] for r in results["postfix"])
                print(f"{conc:>4}  ratio    {ours_acc / pf_acc:11.2f} {ours_e2e / pf_e2e:13.2f}   (goal >= 1.0)")
                # Each round's own pair, run back to back: how far the drift moves a ratio.
                pairs = list(zip(results["ours"], results["postfix"]))
                acc_r = " ".join(f"{o[0] / p[0]:.2f}" for o, p in pairs)
                e2e_r = " ".join(f"{o[1] / p[1]:.2f}" for o, p in pairs)
                print(f"{conc:>4}  by round: accepted {acc_r}; end-to-end {e2e_r}")
        client, bare = handoff_times(base, a.runs)
        print(f"qmail-qmqpc, one 2 KB message: median {client * 1000:.1f} ms; python3 -c pass {bare * 1000:.1f} ms;"
              f" ratio {client / bare:.2f} (goal <= 2.5)")
        cpeak, speak = big_message(base, 50 * 1000 * 1000)
        print(f"50 MB message: peak RSS qmail-qmqpc {cpeak / 1024:.1f} MB, server {speak / 1024:.1f} MB (goal < 60 MB each)")
    finally:
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
