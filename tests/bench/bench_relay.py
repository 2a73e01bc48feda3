#!/usr/bin/env python3
"""Benchmark: relaying a queued backlog to Postfix's smtp-sink on loopback, ours beside a
private Postfix relaying the same backlog to the same sink, in one run.

    .venv/bin/python tests/bench/bench_relay.py [-m 10000] [--concurrency 20,100] [--skip-postfix]

For each concurrency: N messages of 1000 bytes are queued first (ours: through the
queue API with the daemon stopped; Postfix: through its qmqpd with the smtp transport
deferred), then the relay is let go and timed until the queue is empty.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, TOP)
sys.path.insert(0, HERE)

from private_postfix import PrivatePostfix, available, free_port  # noqa: E402
from smarthost.init import init  # noqa: E402
from smarthost.queue import Queue  # noqa: E402

BIN = os.path.dirname(sys.executable)
SINK = "/usr/sbin/smtp-sink"
SOURCE = "/usr/sbin/qmqp-source"
BODY = b"Subject: relay bench\n\n" + b"r" * 975 + b"\n"


def ours(base: str, n: int, conc: int, sink_port: int) -> float:
    root = init(os.path.join(base, f"ours-{conc}"), me="bench.invalid")
    for name, value in (("smtproutes", ":127.0.0.1"), ("smtpport", str(sink_port)),
                        ("concurrencyremote", str(conc))):
        with open(os.path.join(root.control_dir, name), "w") as f:
            f.write(value + "\n")
    q = Queue(root.queue_dir)
    for i in range(n):
        q.inject(BODY, "bench@bench.invalid", [f"rcpt{i % 97}@far.example"], trigger=False)
    log = open(os.path.join(root.path, "bench.log"), "w")
    t = time.perf_counter()
    proc = subprocess.Popen([os.path.join(BIN, "smarthost"), "run", "--root", root.path],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 1800
        while (q.mess_ids() or q.todo_ids()) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = len(q.mess_ids())
        if left:
            raise SystemExit(f"ours: {left} messages still queued; see {log.name}")
        return n / (time.perf_counter() - t)
    finally:
        proc.terminate()
        proc.wait(120)


def postfix(base: str, n: int, conc: int, sink_port: int) -> float:
    pf = PrivatePostfix(os.path.join(base, f"postfix-{conc}"), free_port())
    pf.setup()
    pf._pc("-e", f"relayhost=[127.0.0.1]:{sink_port}", "defer_transports=smtp",
           f"default_destination_concurrency_limit={conc}", f"smtp_destination_concurrency_limit={conc}",
           f"default_process_limit={max(100, conc + 10)}", "smtp_tls_security_level=none")
    pf.start()
    try:
        subprocess.run([SOURCE, "-f", "bench@bench.test", "-t", "rcpt@far.example", "-l", "1000",
                        "-m", str(n), "-s", "20", f"127.0.0.1:{pf.port}"], check=True, stdout=subprocess.DEVNULL)
        while pf.accepted() < n:
            time.sleep(0.1)
        pf._pc("-e", "defer_transports=")
        t = time.perf_counter()
        subprocess.run(["/usr/sbin/postfix", "-c", pf.conf, "reload"], capture_output=True)
        subprocess.run(["/usr/sbin/postqueue", "-c", pf.conf, "-f"], capture_output=True)
        deadline = time.monotonic() + 1800
        while pf.queued() > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        return n / (time.perf_counter() - t)
    finally:
        pf.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", type=int, default=10000)
    ap.add_argument("--concurrency", default="20,100")
    ap.add_argument("--skip-postfix", action="store_true")
    a = ap.parse_args()
    if not os.path.exists(SINK):
        raise SystemExit(f"{SINK} is missing (Debian package postfix)")
    why = "skipped" if a.skip_postfix else available()
    os.makedirs(os.path.join(TOP, "var"), exist_ok=True)
    base = tempfile.mkdtemp(prefix="bench-relay-", dir=os.path.join(TOP, "var"))
    os.chmod(base, 0o755)  # Postfix's own users must reach their directories below it
    sink_port = free_port()
    sink = subprocess.Popen([SINK, "-u", "nobody", f"127.0.0.1:{sink_port}", "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        print(f"{a.m} messages of 1000 bytes relayed to smtp-sink on 127.0.0.1"
              + ("" if why is None else f"; Postfix: {why}"))
        for conc in (int(c) for c in a.concurrency.split(",")):
            mine = ours(base, a.m, conc, sink_port)
            line = f"concurrency {conc:>3}: ours {mine:7.0f} msg/s"
            if why is None:
                theirs = postfix(base, a.m, conc, sink_port)
                line += f"   postfix {theirs:7.0f} msg/s   ratio {mine / theirs:.2f} (goal >= 1.0)"
            print(line, flush=True)
    finally:
        sink.terminate()
        sink.wait(10)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
