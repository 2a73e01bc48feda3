"""config-mini: provisioning a client, all or nothing."""

import os
import subprocess

import pytest

from tests.conftest import program


def run(tmp_path, *args, env=None):
    e = dict(os.environ, MINIQMAIL_ROOT=str(tmp_path / "mini"), **(env or {}))
    return subprocess.run([program("config-mini"), *args], capture_output=True, text=True, env=e, timeout=30)


def control(tmp_path, name):
    return (tmp_path / "mini" / "control" / name).read_text()


def test_writes_the_five_files(tmp_path):
    p = run(tmp_path, "mx.example.com", "example.com", "example.com", "ws1.example.com",
            "192.0.2.10", "192.0.2.11:2628", "[2001:db8::1]:628")
    assert p.returncode == 0, p.stderr
    assert control(tmp_path, "me") == "mx.example.com\n"
    assert control(tmp_path, "defaultdomain") == "example.com\n"
    assert control(tmp_path, "plusdomain") == "example.com\n"
    assert control(tmp_path, "idhost") == "ws1.example.com\n"
    assert control(tmp_path, "qmqpservers") == "192.0.2.10\n192.0.2.11:2628\n[2001:db8::1]:628\n"
    assert oct(os.stat(tmp_path / "mini" / "control" / "me").st_mode & 0o777) == "0o644"


def test_too_few_arguments_is_usage_100(tmp_path):
    p = run(tmp_path, "mx.example.com", "example.com", "example.com", "ws1.example.com")
    assert p.returncode == 100 and "usage: config-mini" in p.stderr
    assert not (tmp_path / "mini").exists()


@pytest.mark.parametrize("args", [
    ("mx..example", "example.com", "example.com", "ws1", "192.0.2.10"),
    ("mx.example", "exa mple.com", "example.com", "ws1", "192.0.2.10"),
    ("mx.example", "example.com", "example.com", "ws1", "192.0.2.10", "300.1.2.3"),
    ("mx.example", "example.com", "example.com", "ws1", "[::1]:99999"),
])
def test_bad_argument_writes_nothing(tmp_path, args):
    assert run(tmp_path, "old.example", "old.example", "old.example", "old", "192.0.2.1").returncode == 0
    p = run(tmp_path, *args)
    assert p.returncode == 100
    assert p.stderr.startswith("config-mini: fatal: ") and p.stderr.count("\n") == 1
    assert control(tmp_path, "me") == "old.example\n"
    assert control(tmp_path, "qmqpservers") == "192.0.2.1\n"
    assert not [n for n in os.listdir(tmp_path / "mini" / "control") if n.startswith(".")]


def test_smarthost_root_gets_an_allow_rule(tmp_path):
    from smarthost.init import init

    sh = init(str(tmp_path / "sh"), me="mx.example.com")
    p = run(tmp_path, "--smarthost-root", sh.path, "mx.example.com", "example.com", "example.com",
            "ws1.example.com", "127.0.0.1:628")
    assert p.returncode == 0, p.stderr
    assert "allowed 127.0.0.1" in p.stdout
    rules = (tmp_path / "sh" / "rules" / "qmqp.rules").read_text()
    assert "127.0.0.1:allow" in rules.splitlines()
    assert (tmp_path / "sh" / "rules" / "qmqp.cdb").exists()
