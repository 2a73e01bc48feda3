"""Helpers the client programs' tests share: a running smart host with a client root
pointed at it, a minimal environment, and a $QMAILQUEUE that keeps what it was given.

The fixtures `smarthost` (one per test module) and `qq` are imported by name into
each test module that uses them.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.conftest import BIN, Daemon

ME = "mx.test.invalid"
DATE = b"Date: 1 Jan 2026 00:00:00 -0000\n"
MSGID = b"Message-ID: <fixed@test>\n"
SCAN = 1 << 16


def command(name: str, module: str | None = None) -> list[str]:
    """The installed console script if there is one beside this interpreter, else `python -m`."""
    script = BIN / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", f"miniqmail.cli.{module or name.replace('-', '_')}"]


def write_control(root: Path, **files: str) -> Path:
    ctl = root / "control"
    ctl.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (ctl / name).write_text(value + "\n")
    return root


def clean_env(root: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: no USER, NAME or QMAIL* leaking in from the test runner."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MINIQMAIL_ROOT": str(root)}
    for var in ("PYTHONPATH", "VIRTUAL_ENV", "TMPDIR"):
        if var in os.environ:
            env[var] = os.environ[var]
    env.update(extra)
    return env


class SmartHost:
    """A running smart host with a QMQP listener, and a client root pointed at it."""

    def __init__(self, base: Path):
        from smarthost.init import init

        self.root = init(str(base / "sh"), me=ME)
        home = Path(self.root.sub("home", "example"))
        # example-anything@ lands in the same Maildir as example@
        (home / ".qmail-default").write_text("./Maildir/\n")
        os.chmod(home / ".qmail-default", 0o600)
        self.maildir = home / "Maildir" / "new"
        self.daemon = Daemon(self.root, ["--qmqp", "127.0.0.1:0"])
        line = self.daemon.wait_log("qmqpd: listening on")
        self.port = int(re.search(r":(\d+)\s*$", line).group(1))
        self.client = write_control(base / "mini", me="ws.test.invalid", defaulthost=ME,
                                    defaultdomain="test.invalid", plusdomain="test.invalid",
                                    idhost="ws.test.invalid", qmqpservers=f"127.0.0.1:{self.port}")

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(self.client, **extra)

    def messages(self, marker: bytes, count: int = 1, timeout: float = 20.0) -> list[bytes]:
        """Wait for `count` delivered messages holding `marker`."""
        deadline = time.monotonic() + timeout
        while True:
            found = []
            for name in sorted(os.listdir(self.maildir)):
                with open(self.maildir / name, "rb") as f:
                    if marker in f.read(SCAN):  # markers live in the header; some bodies are big
                        f.seek(0)
                        found.append(f.read())
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} messages with {marker!r}, wanted {count}")
            time.sleep(0.02)

    def absent(self, marker: bytes, wait: float = 0.5) -> bool:
        time.sleep(wait)
        for name in os.listdir(self.maildir):
            with open(self.maildir / name, "rb") as f:
                if marker in f.read(SCAN):
                    return False
        return True

    def stop(self) -> None:
        self.daemon.stop()


def started_smarthost(tmp_path_factory) -> Iterator[SmartHost]:
    """The body of each test module's `smarthost` fixture: one smart host per module."""
    sh = SmartHost(tmp_path_factory.mktemp("pair"))
    yield sh
    sh.stop()


@pytest.fixture(scope="module")
def smarthost(tmp_path_factory):
    yield from started_smarthost(tmp_path_factory)


def run(argv: list[str], data: bytes, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=data, env=env, capture_output=True, timeout=timeout)


def header_of(message: bytes) -> dict[str, list[str]]:
    head = message.split(b"\n\n", 1)[0].decode("utf-8", "replace").replace("\n ", " ").replace("\n\t", " ")
    out: dict[str, list[str]] = {}
    for line in head.split("\n"):
        name, _, value = line.partition(":")
        out.setdefault(name.lower(), []).append(value.strip())
    return out


class OneByte(io.RawIOBase):
    """A stream that gives one byte per read: decoders must not care how input is cut."""

    def __init__(self, data: bytes):
        self.data = data

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if not self.data:
            return 0
        b[0], self.data = self.data[0], self.data[1:]
        return 1


QUEUE_SCRIPT = """#!/bin/sh
cat > "$DUMP/message" && cat <&1 > "$DUMP/envelope"
"""


def queue_dump(tmp_path: Path) -> tuple[dict[str, str], Callable[[], tuple[bytes, str, list[str]]]]:
    """$QMAILQUEUE as a script keeping the message and envelope: returns (env-extra, reader)."""
    script = tmp_path / "qq"
    script.write_text(QUEUE_SCRIPT)
    script.chmod(0o755)
    dump = tmp_path / "dump"
    dump.mkdir()

    def read() -> tuple[bytes, str, list[str]]:
        env_bytes = (dump / "envelope").read_bytes()
        records = env_bytes.rstrip(b"\0").split(b"\0")
        return ((dump / "message").read_bytes(), records[0][1:].decode(),
                [r[1:].decode() for r in records[1:]])

    return {"QMAILQUEUE": str(script), "DUMP": str(dump)}, read


@pytest.fixture
def qq(tmp_path):
    return queue_dump(tmp_path)
