"""The kit: install-mini into a tmp prefix and send through a real smart host from an empty
environment; the sendmail links and their backups; the smart host's run scripts and unit."""

from __future__ import annotations

import configparser
import importlib.machinery
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from miniqmail import envelope
from tests.conftest import Daemon, wait_files

pytestmark = pytest.mark.timeout(120)

TOP = Path(__file__).resolve().parent.parent
KIT = TOP / "kit"
ME = "mx.test.invalid"
RUN_SCRIPTS = ["smarthost/run", "smarthost/log/run", "qmail-qmqpd/run", "qmail-qmqpd/log/run"]


def install_mini(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(KIT / "install-mini"), "--python", sys.executable, *args],
                          capture_output=True, text=True, timeout=60, env=env)


def client_programs() -> dict[str, str]:
    with open(TOP / "pyproject.toml", "rb") as f:
        table = tomllib.load(f)["project"]["scripts"]
    return {name: target for name, target in table.items() if target.startswith("miniqmail.")}


def start_smarthost(root) -> tuple[Daemon, int]:
    d = Daemon(root, ["--qmqp", "127.0.0.1:0"])
    line = d.wait_log("qmqpd: listening on")
    d.wait_log("status: local 0/")
    return d, int(re.search(r":(\d+)\s*$", line).group(1))


def qmail_queue_interface(program: Path, message: bytes, sender: str, recipients: list[str]) -> int:
    """Run `program` from `env -i` with the message on fd 0 and the envelope on fd 1."""
    rfd, wfd = os.pipe()
    os.write(wfd, envelope.encode(sender, recipients))
    os.close(wfd)
    try:
        return subprocess.run(["env", "-i", str(program)], input=message, stdout=rfd,
                              timeout=60).returncode
    finally:
        os.close(rfd)


# -- install-mini ------------------------------------------------------------------------

def test_install_mini_then_send_from_an_empty_environment(tmp_path, root):
    prefix = tmp_path / "mini"
    p = install_mini(str(prefix))
    assert p.returncode == 0, p.stdout + p.stderr
    assert os.readlink(prefix / "bin" / "qmail-queue") == "qmail-qmqpc"
    assert (prefix / "control").is_dir()
    d, port = start_smarthost(root)
    try:
        (prefix / "control" / "qmqpservers").write_text(f"127.0.0.1:{port}\n")
        for name in ("me", "defaultdomain", "plusdomain", "idhost"):
            (prefix / "control" / name).write_text("ws.test.invalid\n")
        new = root.sub("home", "example", "Maildir", "new")
        for n, program in enumerate(("qmail-qmqpc", "qmail-queue"), 1):
            code = qmail_queue_interface(prefix / "bin" / program, b"Subject: via %s\n\nbody\n" % program.encode(),
                                         "ws@ws.test.invalid", [f"example@{ME}"])
            assert code == 0
            files = wait_files(new, n)
            assert any(b"Subject: via " + program.encode() in Path(f).read_bytes() for f in files)
        sendmail = prefix / "bin" / "sendmail"
        if sendmail.exists():  # only where this checkout has a sendmail program
            p = subprocess.run(["env", "-i", str(sendmail), f"example@{ME}"], timeout=60,
                               input=b"Subject: via sendmail\n\nbody\n", capture_output=True)
            assert p.returncode == 0, p.stderr
            files = wait_files(new, 3)
            assert any(b"Subject: via sendmail" in Path(f).read_bytes() for f in files)
    finally:
        d.stop()


def test_install_mini_makes_a_wrapper_per_client_program(tmp_path):
    prefix = tmp_path / "mini"
    p = install_mini(str(prefix))
    assert p.returncode == 0, p.stderr
    programs = client_programs()
    assert "qmail-qmqpc" in programs
    for name in programs:
        wrapper = prefix / "bin" / name
        assert wrapper.exists() or f"skipping {name}:" in p.stdout
        if wrapper.exists():
            text = wrapper.read_text()
            assert f"MINIQMAIL_ROOT='{prefix}'" in text and os.access(wrapper, os.X_OK)
    assert not [n for n in os.listdir(prefix / "bin") if n not in programs and n != "qmail-queue"]


def test_install_mini_is_idempotent(tmp_path):
    prefix = tmp_path / "mini"
    assert install_mini(str(prefix)).returncode == 0
    before = {n: (prefix / "bin" / n).read_bytes() for n in os.listdir(prefix / "bin")}
    (prefix / "control" / "me").write_text("kept.invalid\n")
    p = install_mini(str(prefix))
    assert p.returncode == 0
    assert "wrote" not in p.stdout
    assert {n: (prefix / "bin" / n).read_bytes() for n in os.listdir(prefix / "bin")} == before
    assert (prefix / "control" / "me").read_text() == "kept.invalid\n"


def load_install_mini():
    loader = importlib.machinery.SourceFileLoader("install_mini", str(KIT / "install-mini"))
    spec = importlib.util.spec_from_loader("install_mini", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_wrapper_for_a_program_not_installed_as_a_script_yet(tmp_path):
    mod = load_install_mini()
    text = mod.wrapper(str(tmp_path / "pre fix'"), "maildirmake", str(tmp_path / "no-bin"),
                       sys.executable, "miniqmail.cli.maildirmake:main")
    wrapper = tmp_path / "maildirmake"
    wrapper.write_text(text)
    wrapper.chmod(0o755)
    p = subprocess.run(["env", "-i", str(wrapper), str(tmp_path / "Maildir")], capture_output=True,
                       timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(tmp_path / "Maildir")) == ["cur", "new", "tmp"]
    p = subprocess.run(["env", "-i", str(wrapper)], capture_output=True, timeout=60)
    assert p.returncode == 100 and p.stderr.startswith(b"maildirmake: usage")


def test_scripts_table_read_with_and_without_tomllib():
    mod = load_install_mini()
    parsed = tomllib.loads((TOP / "pyproject.toml").read_text())["project"]["scripts"]
    assert mod.scripts(str(TOP / "pyproject.toml")) == parsed
    assert mod.scripts_table((TOP / "pyproject.toml").read_text()) == parsed


def test_sendmail_links_are_backed_up_and_restored(tmp_path):
    prefix = tmp_path / "mini"
    sbin, lib = tmp_path / "usr" / "sbin", tmp_path / "usr" / "lib"
    sbin.mkdir(parents=True)
    lib.mkdir(parents=True)
    (sbin / "sendmail").write_text("the old sendmail\n")
    links = f"{sbin / 'sendmail'}:{lib / 'sendmail'}"
    env = dict(os.environ, MINI_QMAIL_SENDMAIL_LINKS=links)
    target = str(prefix / "bin" / "sendmail")
    for _ in range(2):  # the second run finds everything in place
        p = install_mini("--sendmail-links", str(prefix), env=env)
        assert p.returncode == 0, p.stdout + p.stderr
        assert os.readlink(sbin / "sendmail") == target and os.readlink(lib / "sendmail") == target
        assert (sbin / "sendmail.mini-qmail-backup").read_text() == "the old sendmail\n"
        assert not (lib / "sendmail.mini-qmail-backup").exists()
    (prefix / "control" / "me").write_text("kept.invalid\n")
    p = install_mini("--uninstall", str(prefix), env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (sbin / "sendmail").read_text() == "the old sendmail\n" and not (sbin / "sendmail").is_symlink()
    assert os.listdir(sbin) == ["sendmail"] and os.listdir(lib) == []
    assert not (prefix / "bin").exists()
    assert (prefix / "control" / "me").read_text() == "kept.invalid\n"


def test_link_option_and_a_backup_in_the_way(tmp_path):
    prefix = tmp_path / "mini"
    link = tmp_path / "sendmail"
    link.write_text("foreign\n")
    (tmp_path / "sendmail.mini-qmail-backup").write_text("an older backup\n")
    p = install_mini("--link", str(link), str(prefix))
    assert p.returncode == 111
    assert "sendmail.mini-qmail-backup already exists" in p.stderr
    assert link.read_text() == "foreign\n"
    p = install_mini("--uninstall", "--link", str(link), str(prefix))
    assert p.returncode == 0 and link.read_text() == "foreign\n"


def test_install_mini_bad_usage_is_100(tmp_path):
    p = subprocess.run([sys.executable, str(KIT / "install-mini")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 100


# -- the smart host's run scripts and unit -----------------------------------------------

@pytest.fixture
def rendered(tmp_path, root):
    p = subprocess.run(["sh", str(KIT / "install-smarthost"), "-b", str(Path(sys.executable).parent),
                        "-l", "nobody", root.path], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return Path(root.path)


@pytest.mark.parametrize("script", ["install-smarthost", *(f"daemontools/{s}" for s in RUN_SCRIPTS)])
def test_templates_pass_sh_n(script):
    p = subprocess.run(["sh", "-n", str(KIT / script)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert os.access(KIT / script, os.X_OK)


def test_install_smarthost_fills_in_the_root(rendered):
    for script in RUN_SCRIPTS:
        path = rendered / "supervise" / script
        text = path.read_text()
        assert "@" not in text.replace("$@", ""), f"placeholder left in {path}"
        assert subprocess.run(["sh", "-n", str(path)], timeout=30).returncode == 0
        assert os.access(path, os.X_OK)
    qmqpd = (rendered / "supervise" / "qmail-qmqpd" / "run").read_text()
    assert f"ROOT='{rendered}'" in qmqpd
    assert re.search(r'tcpserver .*-x "\$ROOT/rules/qmqp.cdb" -c "\$CONCURRENCY"', qmqpd)
    assert re.search(r'-u "\$QUEUEUID" -g "\$QUEUEGID" 0 628 "\$BIN/qmail-qmqpd"', qmqpd)
    assert "softlimit" in qmqpd
    assert "multilog t" in (rendered / "supervise" / "smarthost" / "log" / "run").read_text()
    assert (rendered / "supervise" / "smarthost" / "log" / "main").is_dir()


def ini_check(path: Path) -> configparser.RawConfigParser:
    unit = configparser.RawConfigParser(strict=False, delimiters=("=",), comment_prefixes=("#", ";"))
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(path)
    assert unit.sections() == ["Unit", "Service", "Install"]
    service = unit["Service"]
    assert service["Restart"] == "on-failure" and service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed" and service["TimeoutStopSec"] == "30min"
    assert "--qmqp 0.0.0.0:628" in service["ExecStart"]
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "full"
    return unit


def test_systemd_unit_parses(rendered):
    unit_path = rendered / "systemd" / "smarthost.service"
    unit = ini_check(unit_path)
    assert unit["Service"]["ExecStart"].startswith(f"{Path(sys.executable).parent}/smarthost run --root {rendered} ")
    ini_check(KIT / "systemd" / "smarthost.service")
    if shutil.which("systemd-analyze") is None:
        return
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit_path)], capture_output=True,
                       text=True, timeout=60)
    ours = [line for line in (p.stdout + p.stderr).splitlines() if unit_path.name in line]
    assert p.returncode == 0 and not ours, p.stdout + p.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("tcpserver") is None, reason="ucspi-tcp's tcpserver is not installed")
def test_qmqpd_run_script_serves_under_tcpserver(tmp_path, rendered, root):
    # The real script, moved to 127.0.0.1 and a free port; a stand-in softlimit if daemontools is absent.
    port = free_port()
    script = (rendered / "supervise" / "qmail-qmqpd" / "run").read_text().replace(" 0 628 ", f" 127.0.0.1 {port} ")
    shims = tmp_path / "shims"
    shims.mkdir()
    if shutil.which("softlimit") is None:
        (shims / "softlimit").write_text('#!/bin/sh\nshift 2\nexec "$@"\n')
        (shims / "softlimit").chmod(0o755)
    tcpserver_dir = os.path.dirname(shutil.which("tcpserver"))
    script = script.replace('PATH="$BIN:', f'PATH="{shims}:{tcpserver_dir}:$BIN:')
    (tmp_path / "run").write_text(script)
    (tmp_path / "run").chmod(0o755)
    subprocess.run([str(Path(sys.executable).parent / "smarthost"), "rules", "allow", "127.0.0.1"],
                   env=dict(os.environ, SMARTHOST_ROOT=root.path), check=True, capture_output=True, timeout=60)
    server = subprocess.Popen([str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    scheduler = Daemon(root)
    try:
        assert server.stdout is not None
        assert b"status: 0/40" in server.stdout.readline()
        scheduler.wait_log("status: local 0/")
        client = tmp_path / "client"
        (client / "control").mkdir(parents=True)
        (client / "control" / "qmqpservers").write_text(f"127.0.0.1:{port}\n")
        rfd, wfd = os.pipe()
        os.write(wfd, envelope.encode("ws@ws.test.invalid", [f"example@{ME}"]))
        os.close(wfd)
        code = subprocess.run([str(Path(sys.executable).parent / "qmail-qmqpc")], stdout=rfd, timeout=60,
                              input=b"Subject: through tcpserver\n\nbody\n",
                              env=dict(os.environ, MINIQMAIL_ROOT=str(client))).returncode
        os.close(rfd)
        assert code == 0
        files = wait_files(root.sub("home", "example", "Maildir", "new"))
        text = Path(files[0]).read_bytes()
        assert b"Subject: through tcpserver" in text and b"by mx.test.invalid with QMQP" in text
    finally:
        scheduler.stop()
        server.terminate()
        server.wait(10)
