"""Project-wide rules: one-way imports, every program's edge, the README's demo."""

import ast
import os
import subprocess
from pathlib import Path

from tests.conftest import program

TOP = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_miniqmail_never_imports_smarthost():
    offenders = []
    for path in (TOP / "miniqmail").rglob("*.py"):
        for name in imported_modules(path):
            if name == "smarthost" or name.startswith("smarthost."):
                offenders.append(f"{path.relative_to(TOP)} imports {name}")
    assert not offenders


def test_demo_once_delivers(tmp_path):
    p = subprocess.run([program("smarthost"), "demo", "--once", "--root", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "delivered to " in p.stdout and "Subject: hello from the demo" in p.stdout
    assert "Delivered-To: example@smarthost.demo.invalid" in p.stdout


def test_run_without_a_root_is_one_line(tmp_path):
    p = subprocess.run([program("smarthost"), "run", "--root", str(tmp_path / "nothing")],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert "smarthost init" in p.stderr


def test_qstat_and_qread_without_a_queue_fail_cleanly(tmp_path):
    env = dict(os.environ, SMARTHOST_ROOT=str(tmp_path))
    for name in ("qmail-qstat", "qmail-qread"):
        p = subprocess.run([program(name)], capture_output=True, text=True, env=env, timeout=30)
        assert p.returncode == 111
        assert p.stderr.startswith(f"{name}: fatal: ") and p.stderr.count("\n") == 1


def test_init_is_idempotent_and_keeps_admin_files(tmp_path):
    from smarthost.init import init

    r = init(str(tmp_path / "r"), me="one.invalid")
    Path(r.control_dir, "me").write_text("changed.invalid\n")
    init(str(tmp_path / "r"), me="two.invalid")
    assert Path(r.control_dir, "me").read_text() == "changed.invalid\n"
    assert Path(r.users_dir, "cdb").exists()
