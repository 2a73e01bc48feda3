#!/usr/bin/env python3
"""Benchmark: injections/s through the queue API and local deliveries/s into a Maildir,
beside the raw create+write+fsync rate of the same disk, all in one run.

    .venv/bin/python tests/bench/bench_queue.py [-n 2000] [--threads 8] [--size 1000]

The raw loop runs before and after the injections (this machine's disk speed
drifts), and the figures are printed side by side.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from smarthost.init import init  # noqa: E402
from smarthost.queue import Queue  # noqa: E402


def raw_rate(directory: str, n: int, size: int) -> float:
    os.makedirs(directory, exist_ok=True)
    data = b"x" * size
    t = time.perf_counter()
    for i in range(n):
        fd = os.open(os.path.join(directory, str(i)), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
    rate = n / (time.perf_counter() - t)
    shutil.rmtree(directory)
    return rate


def inject_rate(q: Queue, n: int, threads: int, body: bytes) -> float:
    def one(i: int) -> None:
        q.inject(body, "bench@far.example", ["example@bench.invalid"], trigger=False)

    t = time.perf_counter()
    if threads == 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(one, range(n)))
    return n / (time.perf_counter() - t)


def deliver_rate(root, n: int) -> float:
    new = root.sub("home", "example", "Maildir", "new")
    log_path = root.sub("bench.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "smarthost"), "run",
                                 "--root", root.path], stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, SMARTHOST_ROOT=root.path))
    while "status: local 0/" not in open(log_path).read(4096):  # ready: nothing preprocessed yet
        time.sleep(0.001)
    t = time.perf_counter()
    while len(os.listdir(new)) < n:
        time.sleep(0.005)
        if time.perf_counter() - t > 600:
            raise SystemExit("deliveries did not finish in 10 minutes")
    rate = n / (time.perf_counter() - t)
    proc.terminate()
    proc.wait(60)
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000, help="messages (default 2000)")
    ap.add_argument("--threads", type=int, default=8, help="concurrent injectors (default 8)")
    ap.add_argument("--size", type=int, default=1000, help="message size in bytes (default 1000)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one under the checkout's var/)")
    a = ap.parse_args()

    base = a.dir or os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "var")
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench-", dir=base)
    try:
        body = b"Subject: bench\n\n" + b"x" * max(0, a.size - 17) + b"\n"
        raw1 = raw_rate(os.path.join(work, "raw"), a.n, a.size)
        root1 = init(os.path.join(work, "root1"), me="bench.invalid")
        inj1 = inject_rate(Queue(root1.queue_dir), a.n, 1, body)
        root = init(os.path.join(work, "root"), me="bench.invalid")
        injn = inject_rate(Queue(root.queue_dir), a.n, a.threads, body)
        raw2 = raw_rate(os.path.join(work, "raw"), a.n, a.size)
        dlv = deliver_rate(root, a.n)
        raw = (raw1 + raw2) / 2
        print(f"messages: {a.n} of {a.size} bytes, work dir {work}")
        print(f"raw create+write+fsync loop:     {raw1:8.0f} /s before, {raw2:8.0f} /s after (mean {raw:.0f})")
        print(f"injections, 1 thread:            {inj1:8.0f} /s   ratio to raw {inj1 / raw:.2f}")
        print(f"injections, {a.threads} threads:           {injn:8.0f} /s   ratio to raw {injn / raw:.2f}  (goal >= 0.50)")
        print(f"local deliveries into a Maildir: {dlv:8.0f} /s   (goal >= 1000; queue to new/, incl. preprocessing)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
