#!/usr/bin/env python3
"""Benchmark: `sendmail -t -i` of a 2 KB message through a real smart host, whole process,
median wall time beside `python3 -c pass` in the same run (goal: at most 2.5 times).

    .venv/bin/python tests/bench/bench_sendmail.py [--runs 31]
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

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, TOP)

from smarthost.init import init  # noqa: E402

BIN = os.path.dirname(sys.executable)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=31)
    a = ap.parse_args()
    os.makedirs(os.path.join(TOP, "var"), exist_ok=True)
    base = tempfile.mkdtemp(prefix="bench-sendmail-", dir=os.path.join(TOP, "var"))
    root = init(os.path.join(base, "smarthost"), me="bench.invalid")
    log = open(os.path.join(base, "daemon.log"), "w+")
    daemon = subprocess.Popen([os.path.join(BIN, "smarthost"), "run", "--root", root.path,
                               "--qmqp", "127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT)
    try:
        port = None
        for _ in range(1000):
            m = re.search(r"qmqpd: listening on .*:(\d+)", open(log.name).read())
            if m:
                port = int(m.group(1))
                break
            time.sleep(0.02)
        if port is None:
            raise SystemExit("the smart host did not start")
        ctl = os.path.join(base, "client", "control")
        os.makedirs(ctl)
        for name, value in (("me", "ws.bench.invalid"), ("qmqpservers", f"127.0.0.1:{port}")):
            with open(os.path.join(ctl, name), "w") as f:
                f.write(value + "\n")
        env = dict(os.environ, MINIQMAIL_ROOT=os.path.join(base, "client"), USER="bench")
        msg = (b"To: example@bench.invalid\nSubject: 2k\n\n" + b"y" * 2000 + b"\n")
        py = os.path.join(BIN, "python")
        send, bare = [], []
        for _ in range(a.runs):
            t = time.perf_counter()
            subprocess.run([py, "-c", "pass"], check=True)
            bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run([os.path.join(BIN, "sendmail"), "-t", "-i"], input=msg, env=env, check=True)
            send.append(time.perf_counter() - t)
        s, b = statistics.median(send), statistics.median(bare)
        print(f"sendmail -t -i, one 2 KB message: median {s * 1000:.1f} ms; "
              f"python3 -c pass {b * 1000:.1f} ms; ratio {s / b:.2f} (goal <= 2.5)")
    finally:
        daemon.terminate()
        daemon.wait(60)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
