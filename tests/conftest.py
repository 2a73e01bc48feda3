"""Shared fixtures: a fresh user-mode smart-host root, program runners and a running daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# helper modules that tests import and also load as fixture plugins
pytest.register_assert_rewrite("tests.client_kit", "tests.remote_site")

BIN = Path(sys.executable).parent


def program(name: str) -> str:
    return str(BIN / name)


def closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def root(tmp_path):
    """A user-mode smart-host root. Remote mail is routed to a closed port on
    127.0.0.1, so nothing ever looks up or reaches a host outside this machine."""
    from smarthost.init import init

    r = init(str(tmp_path / "root"), me="mx.test.invalid")
    with open(os.path.join(r.control_dir, "smtproutes"), "w") as f:
        f.write(":127.0.0.1\n")
    with open(os.path.join(r.control_dir, "smtpport"), "w") as f:
        f.write(f"{closed_port()}\n")
    return r


def queue_with_program(root, message: bytes, env_bytes: bytes | None, extra_env=None):
    """Run qmail-queue with `message` on fd 0 and `env_bytes` on fd 1 (None: fd 1 closed)."""
    env = dict(os.environ, SMARTHOST_ROOT=root.path, **(extra_env or {}))
    if env_bytes is None:
        return subprocess.run([program("qmail-queue")], input=message, stdout=subprocess.DEVNULL,
                              env=env, timeout=30, preexec_fn=lambda: os.close(1)).returncode
    rfd, wfd = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(wfd, env_bytes), os.close(wfd)))
    writer.start()
    try:
        return subprocess.run([program("qmail-queue")], input=message, stdout=rfd, env=env,
                              timeout=30).returncode
    finally:
        os.close(rfd)
        writer.join()


class Daemon:
    """`smarthost run` as a real child process, its log collected line by line."""

    def __init__(self, root, extra_args=()):
        self.root = root
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self.proc = subprocess.Popen(
            [program("smarthost"), "run", "--root", root.path, *extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, SMARTHOST_ROOT=root.path))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()

    def wait_log(self, pred, timeout=20.0) -> str:
        """Wait for a log line satisfying `pred` (a substring or a function)."""
        test = (lambda s: pred in s) if isinstance(pred, str) else pred
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.lines:
                    if test(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no log line matching {pred!r}; log:\n" + "\n".join(self.lines[-40:]))
                self._cv.wait(left)

    def count(self, pred) -> int:
        with self._cv:
            return sum(1 for line in self.lines if pred in line)

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


@pytest.fixture
def daemon(root):
    started: list[Daemon] = []

    def start(extra_args=()):
        d = Daemon(root, extra_args)
        started.append(d)
        d.wait_log("status: local 0/")
        return d

    yield start
    for d in started:
        d.stop()


def wait_files(directory, count=1, timeout=20.0) -> list[str]:
    """Wait until `directory` holds at least `count` files; return their paths, sorted."""
    deadline = time.monotonic() + timeout
    while True:
        names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        if len(names) >= count:
            return [os.path.join(directory, n) for n in names]
        if time.monotonic() > deadline:
            raise AssertionError(f"{directory} holds {len(names)} files, wanted {count}")
        time.sleep(0.02)


async def run_scheduler_until(sched, out, marker: str, timeout: float = 20.0) -> None:
    """Run a smarthost.send.Scheduler in this process until `marker` shows in its log
    (a StringIO behind its Log), then stop it the way SIGTERM does."""
    import asyncio

    task = asyncio.create_task(sched.run())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        sched.log.flush()
        if marker in out.getvalue():
            break
    sched.on_term()
    await task


class GatedFsync:
    """Stands for maildir.fsync_dir in the scheduler's process (or wraps the AIO fsyncs
    that replace it, `aio`): records which directory each call syncs, holds every call
    until `gate` is set, and fails while `error` is set."""

    def __init__(self, real):
        self.real = real
        self.calls: list[tuple[int, int]] = []
        self.gate = threading.Event()
        self.error: OSError | None = None

    def __call__(self, fd: int) -> None:
        st = os.fstat(fd)
        self.calls.append((st.st_dev, st.st_ino))
        self.gate.wait(20)
        if self.error is not None:
            raise self.error
        self.real(fd)

    def aio(self, real_fsync):
        """The same gate around aiofsync.LoopFsyncs.fsync: each fsync really goes to the
        kernel, and its future is settled only once the gate is open."""
        import asyncio

        async def release(fut, held):
            try:
                await fut
                err = None
            except OSError as e:
                err = e
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
            err = self.error or err
            if not held.done():
                held.set_exception(err) if err else held.set_result(None)

        def fsync(kernel, fds):
            futs = real_fsync(kernel, fds)
            if futs is None:
                return None
            held = []
            for fd, fut in zip(fds, futs):
                st = os.fstat(fd)
                self.calls.append((st.st_dev, st.st_ino))
                held.append(kernel.loop.create_future())
                kernel.loop.create_task(release(fut, held[-1]))
            return held
        return fsync


_aio_works: list[bool] = []


def aio_fsync_works() -> bool:
    """Whether this machine's kernel takes an AIO fsync from an event loop."""
    if not _aio_works:
        import asyncio
        import tempfile

        from smarthost import aiofsync

        async def probe() -> bool:
            kernel = aiofsync.LoopFsyncs.open(asyncio.get_running_loop())
            if kernel is None:
                return False
            fd = os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY)
            try:
                futs = kernel.fsync([fd])
                return futs is not None and await futs[0] is None
            finally:
                kernel.close()
                os.close(fd)
        _aio_works.append(asyncio.run(probe()))
    return _aio_works[0]


@pytest.fixture(params=["aio", "threads"])
def new_dir_fsync(request, monkeypatch) -> GatedFsync:
    """A GatedFsync for the scheduler's fsyncs of new/: by AIO, or (where that is not to
    be had, and forced here) in a worker thread."""
    from smarthost import aiofsync, spawnclient

    fsync = GatedFsync(spawnclient.maildir.fsync_dir)
    if request.param == "aio":
        if not aio_fsync_works():
            pytest.skip("this kernel takes no AIO fsync from an event loop")
        monkeypatch.setattr(aiofsync.LoopFsyncs, "fsync", fsync.aio(aiofsync.LoopFsyncs.fsync))
    else:
        monkeypatch.setattr(aiofsync.LoopFsyncs, "open", classmethod(lambda cls, loop: None))
        monkeypatch.setattr(spawnclient.maildir, "fsync_dir", fsync)
    return fsync
