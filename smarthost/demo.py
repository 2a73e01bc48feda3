"""`smarthost demo`: the whole pair on one machine, in user mode, inside the checkout.

Starts a smart host under ROOT/smarthost listening for QMQP on 127.0.0.1 (an
unprivileged port), provisions a client under ROOT/client with config-mini,
sends one message through qmail-qmqpc, shows it delivered in a Maildir, then
keeps serving until Ctrl-C.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time

from miniqmail import envelope
from smarthost.init import init

ME = "smarthost.demo.invalid"


def _bin(name: str) -> str:
    """A console script next to the running interpreter (the virtual environment's bin/)."""
    return os.path.join(os.path.dirname(sys.executable), name)


def wait_for_new(maildir: str, before: set[str], timeout: float = 20.0) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = set(os.listdir(os.path.join(maildir, "new"))) - before
        if fresh:
            return os.path.join(maildir, "new", sorted(fresh)[0])
        time.sleep(0.05)
    return None


def demo(base: str, once: bool, port: int = 0) -> int:
    base = os.path.abspath(base)
    root = init(os.path.join(base, "smarthost"), me=ME)
    client = os.path.join(base, "client")
    maildir = root.sub("home", "example", "Maildir")
    before = set(os.listdir(os.path.join(maildir, "new")))
    print(f"demo: smart host root {root.path}")
    daemon = subprocess.Popen([_bin("smarthost"), "run", "--root", root.path, "--qmqp", f"127.0.0.1:{port}"],
                              env=dict(os.environ, SMARTHOST_ROOT=root.path),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    echo = threading.Event()

    def drain() -> None:  # the daemon must never block on its log
        for line in daemon.stdout:  # type: ignore[union-attr]
            lines.put(line)
            if echo.is_set():
                sys.stdout.write("log: " + line)
                sys.stdout.flush()

    threading.Thread(target=drain, daemon=True).start()
    try:
        port = _listening_port(lines, daemon)
        if port is None:
            print("demo: the smart host did not start listening", file=sys.stderr)
            return 111
        print(f"demo: smart host listening for QMQP on 127.0.0.1:{port}")
        env = dict(os.environ, MINIQMAIL_ROOT=client)
        cfg = subprocess.run([_bin("config-mini"), "--smarthost-root", root.path, ME, "demo.invalid",
                              "demo.invalid", "workstation.demo.invalid", f"127.0.0.1:{port}"],
                             env=env, capture_output=True, text=True)
        sys.stdout.write(cfg.stdout)
        if cfg.returncode != 0:
            sys.stderr.write(cfg.stderr)
            return 111
        message = (f"From: demo@workstation.demo.invalid\nTo: example@{ME}\n"
                   "Subject: hello from the demo\n\n"
                   "This message went from qmail-qmqpc over QMQP to the smart host's queue\n"
                   "and on into a Maildir.\n").encode()
        rfd, wfd = os.pipe()
        os.write(wfd, envelope.encode("demo@workstation.demo.invalid", [f"example@{ME}"]))
        os.close(wfd)
        q = subprocess.run([_bin("qmail-qmqpc")], input=message, stdout=rfd, env=env)
        os.close(rfd)
        print(f"demo: qmail-qmqpc exited {q.returncode}")
        if q.returncode != 0:
            return 111
        path = wait_for_new(maildir, before)
        if path is None:
            print("demo: the message did not arrive within 20 seconds", file=sys.stderr)
            return 111
        print(f"demo: delivered to {path}\n")
        with open(path, "rb") as f:
            sys.stdout.write(f.read().decode("utf-8", "replace"))
        if once:
            return 0
        print("\ndemo: serving until Ctrl-C. Send more with:\n"
              f"  printf 'Subject: hi\\n\\nhello\\n' | MINIQMAIL_ROOT={client} {_bin('qmail-qmqpc')} "
              f"1< <(printf 'Fme@workstation.demo.invalid\\0Texample@{ME}\\0\\0')\n"
              f"  (new mail lands in {maildir}/new/; the smart host's log follows)")
        while not lines.empty():
            sys.stdout.write("log: " + lines.get())
        echo.set()
        daemon.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if daemon.poll() is None:
            daemon.terminate()
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()


def _listening_port(lines: "queue.Queue[str]", daemon: subprocess.Popen, timeout: float = 20.0) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            if daemon.poll() is not None:
                return None
            continue
        m = re.search(r"qmqpd: listening on .*:(\d+)\s*$", line)
        if m:
            return int(m.group(1))
    return None
