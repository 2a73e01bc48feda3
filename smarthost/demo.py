"""`smarthost demo`: a user-mode smart host inside the checkout, one message through it, shown in a Maildir."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from miniqmail import envelope
from smarthost.init import init


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


def demo(root_path: str, once: bool) -> int:
    root = init(root_path, me="smarthost.demo.invalid")
    env = dict(os.environ, SMARTHOST_ROOT=root.path)
    maildir = root.sub("home", "example", "Maildir")
    before = set(os.listdir(os.path.join(maildir, "new")))
    print(f"smarthost demo: root {root.path}")
    daemon = subprocess.Popen([_bin("smarthost"), "run", "--root", root.path], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        message = (b"From: demo@smarthost.demo.invalid\n"
                   b"To: example@smarthost.demo.invalid\n"
                   b"Subject: hello from the demo\n\n"
                   b"This message went through qmail-queue, the queue and local delivery.\n")
        env_bytes = envelope.encode("demo@smarthost.demo.invalid", ["example@smarthost.demo.invalid"])
        rfd, wfd = os.pipe()
        os.write(wfd, env_bytes)
        os.close(wfd)
        q = subprocess.run([_bin("qmail-queue")], input=message, stdout=rfd, env=env)
        os.close(rfd)
        print(f"smarthost demo: qmail-queue exited {q.returncode}")
        if q.returncode != 0:
            return 111
        path = wait_for_new(maildir, before)
        if path is None:
            print("smarthost demo: the message did not arrive within 20 seconds", file=sys.stderr)
            return 111
        print(f"smarthost demo: delivered to {path}\n")
        with open(path, "rb") as f:
            sys.stdout.write(f.read().decode("utf-8", "replace"))
        if once:
            return 0
        print("\nsmarthost demo: serving until Ctrl-C; queue more mail with:\n"
              f"  SMARTHOST_ROOT={root.path} {_bin('qmail-queue')} < message 1< envelope\n"
              f"  (new mail lands in {maildir}/new/)")
        for line in daemon.stdout:  # type: ignore[union-attr]
            sys.stdout.write("log: " + line)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
