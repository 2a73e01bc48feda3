"""qmail-showctl against real client roots: values, defaults, strangers, and the only failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from miniqmail.showctl import printable


def showctl(root: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "qmail-showctl"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "miniqmail.cli.qmail_showctl"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, MINIQMAIL_ROOT=str(root)))


def client_root(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "mini"
    (root / "control").mkdir(parents=True)
    for name, text in files.items():
        (root / "control" / name).write_text(text)
    return root


def test_values_defaults_and_strangers(tmp_path):
    root = client_root(tmp_path, {
        "me": "mx.example.com\n",
        "plusdomain": "example.com  \n",
        "qmqpservers": "# the smart hosts\n192.0.2.10\n\n192.0.2.11:2628\n[2001:db8::1]\n-bad-\n",
        "timeoutconnect": "5\n",
        "concurrencylocal": "10\n",
        "notes.txt": "hello\n",
    })
    p = showctl(root)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    assert p.stdout == f"""\
qmail home directory: {root}.
queue: none here; every message goes by QMQP to a server of control/qmqpservers.

defaultdomain: (Default.) A host name without a dot gets .mx.example.com added.

defaulthost: (Default.) An address without a host gets @mx.example.com added.

idhost: (Default.) New Message-IDs end in @mx.example.com.

me: This host is mx.example.com.

plusdomain: A host name ending in + gets example.com in place of the +.

qmqpservers: 
QMQP server: 192.0.2.10.
QMQP server: 192.0.2.11:2628.
QMQP server: [2001:db8::1]:628.
Skipped, not a QMQP server: -bad-.

timeoutconnect: A QMQP server gets 5 seconds to accept a connection.

timeoutremote: (Default.) A QMQP server gets 60 seconds for each read and write.

concurrencylocal: A qmail server's file; mini-qmail does not read it.

notes.txt: I have no idea what this file does.
"""


def test_empty_control_directory_is_all_defaults(tmp_path):
    p = showctl(client_root(tmp_path, {}))
    assert p.returncode == 0
    assert "me: (Default.) This host has no name; set control/me." in p.stdout
    assert "defaulthost: (Default.) An address without a host gets @defaulthost added." in p.stdout
    assert "qmqpservers: (Default.) No QMQP servers; nothing can be sent." in p.stdout
    assert "I have no idea" not in p.stdout


def test_an_unreadable_file_is_reported_not_fatal(tmp_path):
    root = client_root(tmp_path, {"me": "mx.example.com\n"})
    (root / "control" / "idhost").mkdir()  # unreadable as a file, even for root
    p = showctl(root)
    assert p.returncode == 0
    assert "idhost: Oops! Trouble reading this file." in p.stdout
    assert "me: This host is mx.example.com." in p.stdout


def test_unreadable_me_leaves_the_literal_defaults(tmp_path):
    root = client_root(tmp_path, {})
    (root / "control" / "me").mkdir()
    p = showctl(root)
    assert p.returncode == 0
    assert "me: Oops! Trouble reading this file." in p.stdout
    assert "idhost: (Default.) New Message-IDs end in @idhost." in p.stdout


def test_non_printable_bytes_become_question_marks(tmp_path):
    root = client_root(tmp_path, {})
    (root / "control" / "me").write_bytes(b"mx\x01.example\xc3\xa9\n")
    assert "me: This host is mx?.example??." in showctl(root).stdout
    assert printable("a\tb") == "a?b"


def test_missing_root_is_111(tmp_path):
    p = showctl(tmp_path / "nothing")
    assert p.returncode == 111
    assert p.stdout == f"Oops! Unable to chdir to {tmp_path / 'nothing'}.\n"
    assert p.stderr.startswith("qmail-showctl: fatal: unable to chdir") and p.stderr.count("\n") == 1


def test_unreadable_control_directory_is_111(tmp_path):
    root = tmp_path / "mini"
    root.mkdir()
    (root / "control").write_text("not a directory\n")
    p = showctl(root)
    assert p.returncode == 111
    assert p.stdout.startswith(f"Oops! Unable to read {root / 'control'}: ")
    assert "Traceback" not in p.stderr
