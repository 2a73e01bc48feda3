"""maildirmake, maildir2mbox and maildirwatch: run as programs against real directories."""

from __future__ import annotations

import io
import os
import pty
import re
import resource
import select
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from miniqmail import maildir
from miniqmail.datefmt import ctime_gmt
from miniqmail.maildirmbox import sender_of, write_entry
from miniqmail.maildirsummary import CLEAR, TEXT_LIMIT, summarize

T0 = 1_700_000_000  # a settled moment, long past


def command(name: str, module: str) -> list[str]:
    """The installed script when there is one, else the module run by this interpreter."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", f"miniqmail.cli.{module}"]


def run(name: str, module: str, *args: str, env: dict[str, str] | None = None, **kw):
    full = {k: v for k, v in os.environ.items() if k not in ("MAIL", "MAILTMP", "MAILDIR")}
    full.update(env or {})
    return subprocess.run([*command(name, module), *args], capture_output=True, env=full,
                          timeout=60, **kw)


def put(md: Path, sub: str, name: str, data: bytes, mtime: float) -> Path:
    path = md / sub / name
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- maildirmake -------------------------------------------------------------------------

def test_maildirmake_makes_the_four_directories_0700(tmp_path):
    p = run("maildirmake", "maildirmake", str(tmp_path / "Maildir"))
    assert p.returncode == 0, p.stderr
    for sub in ("", "tmp", "new", "cur"):
        assert mode(tmp_path / "Maildir" / sub) == 0o700
    assert sorted(os.listdir(tmp_path / "Maildir")) == ["cur", "new", "tmp"]


def test_maildirmake_refuses_an_existing_directory(tmp_path):
    (tmp_path / "Maildir").mkdir()
    p = run("maildirmake", "maildirmake", str(tmp_path / "Maildir"))
    assert p.returncode == 111
    assert p.stderr.decode().startswith("maildirmake: fatal: unable to mkdir ")
    assert p.stderr.count(b"\n") == 1
    assert os.listdir(tmp_path / "Maildir") == []


def test_maildirmake_missing_parent_is_111_and_no_argument_100(tmp_path):
    p = run("maildirmake", "maildirmake", str(tmp_path / "no" / "Maildir"))
    assert p.returncode == 111 and b"Traceback" not in p.stderr
    p = run("maildirmake", "maildirmake")
    assert p.returncode == 100 and b"usage: maildirmake" in p.stderr


# -- maildir2mbox: the entry format ------------------------------------------------------

@pytest.mark.parametrize("first, sender", [
    (b"Return-Path: <alice@example.com>\n", "alice@example.com"),
    (b"Return-Path: <>\n", ""),
    (b"Return-Path: <a b\tc@example.com>\n", "a b\tc@example.com"),
    (b"Received: from x\n", "XXX"),
    (b"Return-Path: <cut@example.com>", "XXX"),  # no LF: not a whole line
])
def test_sender_of(first, sender):
    assert sender_of(first) == sender


def test_entry_quotes_from_lines_and_ends_partial_lines():
    message = (b"Return-Path: <a b@x>\nSubject: s\n\nFrom here\n>From there\n>>From x\n"
               b"Fromage\n From not\nlast")
    out = io.BytesIO()
    write_entry(out, io.BytesIO(message), T0)
    assert out.getvalue() == (
        f"From a-b@x {ctime_gmt(T0)}\n".encode()
        + b"Return-Path: <a b@x>\nSubject: s\n\n>From here\n>>From there\n>>>From x\n"
          b"Fromage\n From not\nlast\n\n")


def test_entry_for_empty_and_null_sender_messages():
    out = io.BytesIO()
    write_entry(out, io.BytesIO(b""), T0)
    write_entry(out, io.BytesIO(b"Return-Path: <>\n\nbody\n"), T0 + 1)
    assert out.getvalue() == (f"From XXX {ctime_gmt(T0)}\n\n".encode()
                              + f"From MAILER-DAEMON {ctime_gmt(T0 + 1)}\n".encode()
                              + b"Return-Path: <>\n\nbody\n\n")


# -- maildir2mbox: the program -----------------------------------------------------------

@pytest.fixture
def md(tmp_path):
    maildir.make(str(tmp_path / "Maildir"))
    return tmp_path / "Maildir"


def env_for(tmp_path, md, mail=None, mailtmp=None):
    return {"MAILDIR": str(md), "MAIL": str(mail or tmp_path / "Mailbox"),
            "MAILTMP": str(mailtmp or tmp_path / "Mailbox.tmp")}


OLD = b"From old@example.com Thu Jan 01 00:00:00 1970\nSubject: old\n\nold body\n\n"


def test_maildir2mbox_appends_new_and_cur_oldest_first(tmp_path, md):
    mail = tmp_path / "Mailbox"
    mail.write_bytes(OLD)
    os.chmod(mail, 0o640)
    put(md, "new", "1.a.host", b"Return-Path: <third@example.com>\n\nFrom the third\n", T0 + 20)
    put(md, "cur", "2.b.host:2,S", b"Return-Path: <>\n\n>From the first\n", T0)
    put(md, "new", "3.c.host", b"Subject: no return path\n\nsecond, no LF", T0 + 10)
    (md / "new" / ".hidden").write_bytes(b"not a message")
    p = run("maildir2mbox", "maildir2mbox", env=env_for(tmp_path, md))
    assert p.returncode == 0, p.stderr
    assert p.stderr == b""
    assert mail.read_bytes() == (
        OLD
        + f"From MAILER-DAEMON {ctime_gmt(T0)}\n".encode() + b"Return-Path: <>\n\n>>From the first\n\n"
        + f"From XXX {ctime_gmt(T0 + 10)}\n".encode() + b"Subject: no return path\n\nsecond, no LF\n\n"
        + f"From third@example.com {ctime_gmt(T0 + 20)}\n".encode()
        + b"Return-Path: <third@example.com>\n\n>From the third\n\n")
    assert sorted(os.listdir(md / "new")) == [".hidden"]
    assert os.listdir(md / "cur") == []
    assert not (tmp_path / "Mailbox.tmp").exists()
    assert mode(mail) == 0o640


def test_maildir2mbox_creates_the_mbox_0600(tmp_path, md):
    put(md, "new", "1.a.host", b"Subject: x\n\nbody\n", T0)
    assert run("maildir2mbox", "maildir2mbox", env=env_for(tmp_path, md)).returncode == 0
    assert (tmp_path / "Mailbox").read_bytes() == f"From XXX {ctime_gmt(T0)}\n".encode() + b"Subject: x\n\nbody\n\n"
    assert mode(tmp_path / "Mailbox") == 0o600


def test_maildir2mbox_warns_when_a_moved_message_cannot_be_unlinked(tmp_path, md, monkeypatch):
    from miniqmail.maildirmbox import maildir2mbox

    two_messages(md)
    stuck = str(md / "new" / "1.a.host")
    real_unlink = os.unlink

    def unlink(path, *a, **kw):
        if str(path) == stuck:  # the disk refuses this one (EROFS, EIO...)
            raise PermissionError(13, "Permission denied")
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    warnings: list[str] = []
    assert maildir2mbox(str(md), str(tmp_path / "Mailbox"), str(tmp_path / "Mailbox.tmp"),
                        warn=warnings.append) == 2
    assert warnings == [f"{stuck} will be delivered twice; unable to unlink: Permission denied"]
    assert b"Subject: one" in (tmp_path / "Mailbox").read_bytes()
    assert os.listdir(md / "new") == ["1.a.host"]


def test_maildir2mbox_through_a_symlinked_mail(tmp_path, md):
    real = tmp_path / "spool" / "user"
    real.parent.mkdir()
    real.write_bytes(OLD)
    (tmp_path / "Mailbox").symlink_to(real)
    put(md, "new", "1.a.host", b"Subject: x\n\nbody\n", T0)
    assert run("maildir2mbox", "maildir2mbox", env=env_for(tmp_path, md,
               mailtmp=tmp_path / "spool" / ".user.tmp")).returncode == 0
    assert (tmp_path / "Mailbox").is_symlink()
    assert real.read_bytes() == OLD + f"From XXX {ctime_gmt(T0)}\n".encode() + b"Subject: x\n\nbody\n\n"


def test_maildir2mbox_with_nothing_to_do_leaves_mail_alone(tmp_path, md):
    future = time.time() + 3600  # not settled yet: its order is not known
    put(md, "new", "9.z.host", b"Subject: later\n\n", future)
    p = run("maildir2mbox", "maildir2mbox", env=env_for(tmp_path, md))
    assert p.returncode == 0 and p.stderr == b""
    assert not (tmp_path / "Mailbox").exists()
    assert os.listdir(md / "new") == ["9.z.host"]


def test_maildir2mbox_removes_stale_tmp_files(tmp_path, md):
    stale = put(md, "tmp", "stale", b"x", time.time() - 40 * 3600)
    fresh = put(md, "tmp", "fresh", b"x", time.time() - 3600)
    assert run("maildir2mbox", "maildir2mbox", env=env_for(tmp_path, md)).returncode == 0
    assert not stale.exists() and fresh.exists()


def assert_untouched(tmp_path, md, mail_bytes=OLD):
    assert (tmp_path / "Mailbox").read_bytes() == mail_bytes
    assert sorted(os.listdir(md / "new")) == ["1.a.host", "2.b.host"]
    assert not (tmp_path / "Mailbox.tmp").exists()


def two_messages(md, size=10):
    put(md, "new", "1.a.host", b"Subject: one\n\n" + b"x" * size + b"\n", T0)
    put(md, "new", "2.b.host", b"Subject: two\n\n" + b"y" * size + b"\n", T0 + 1)


def test_maildir2mbox_mailtmp_in_a_missing_directory_changes_nothing(tmp_path, md):
    (tmp_path / "Mailbox").write_bytes(OLD)
    two_messages(md)
    p = run("maildir2mbox", "maildir2mbox",
            env=env_for(tmp_path, md, mailtmp=tmp_path / "nowhere" / "Mailbox.tmp"))
    assert p.returncode == 111
    assert p.stderr.decode().startswith("maildir2mbox: fatal: unable to create ")
    assert_untouched(tmp_path, md)


@pytest.mark.parametrize("where", ["missing-dir", "a-directory"])
def test_maildir2mbox_unwritable_mail_changes_nothing(tmp_path, md, where):
    mail = tmp_path / "nowhere" / "Mailbox" if where == "missing-dir" else tmp_path / "boxdir"
    if where == "a-directory":
        mail.mkdir()
    two_messages(md)
    p = run("maildir2mbox", "maildir2mbox", env=env_for(tmp_path, md, mail=mail))
    assert p.returncode == 111
    assert p.stderr.decode().startswith("maildir2mbox: fatal: unable to lock ")
    assert sorted(os.listdir(md / "new")) == ["1.a.host", "2.b.host"]


def test_maildir2mbox_disk_full_midway_changes_nothing(tmp_path, md):
    (tmp_path / "Mailbox").write_bytes(OLD)
    two_messages(md, size=4000)
    limit = len(OLD) + 3000  # room for the old mbox, not for the first message

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = run("maildir2mbox", "maildir2mbox", env=env_for(tmp_path, md), preexec_fn=small_files)
    assert p.returncode == 111, p.stderr
    assert p.stderr.decode().startswith("maildir2mbox: fatal: unable to write to ")
    assert_untouched(tmp_path, md)


def test_maildir2mbox_refuses_mailtmp_equal_to_mail(tmp_path, md):
    (tmp_path / "Mailbox").write_bytes(OLD)
    two_messages(md)
    p = run("maildir2mbox", "maildir2mbox",
            env=env_for(tmp_path, md, mailtmp=tmp_path / "." / "Mailbox"))
    assert p.returncode == 111
    assert (tmp_path / "Mailbox").read_bytes() == OLD
    assert sorted(os.listdir(md / "new")) == ["1.a.host", "2.b.host"]


def test_two_maildir2mbox_at_once_move_each_message_once(tmp_path, md):
    (tmp_path / "Mailbox").write_bytes(OLD)
    for i in range(300):
        put(md, "new" if i % 2 else "cur", f"{i}.m.host", b"Subject: %d\n\nFrom %d\n" % (i, i), T0 + i)
    env = dict(os.environ, **env_for(tmp_path, md))
    procs = [subprocess.Popen(command("maildir2mbox", "maildir2mbox"), env=env, stderr=subprocess.PIPE)
             for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    mbox = (tmp_path / "Mailbox").read_bytes()
    assert mbox.startswith(OLD)
    subjects = [int(n) for n in re.findall(rb"^Subject: (\d+)$", mbox[len(OLD):], re.M)]
    assert subjects == list(range(300))
    assert mbox.count(b"\n>From ") == 300
    assert os.listdir(md / "new") == [] and os.listdir(md / "cur") == []


def test_a_maildir2mbox_that_opens_the_new_mbox_waits_until_its_messages_are_gone(tmp_path, md, monkeypatch):
    """Between the rename of MAILTMP over MAIL and the last unlink, another run that
    opens MAIL gets the new file: it must wait, not append those messages again."""
    from miniqmail.maildirmbox import maildir2mbox

    for i in range(20):
        put(md, "new", f"{i}.m.host", b"Subject: %d\n\nbody\n" % i, T0 + i)
    env = dict(os.environ, **env_for(tmp_path, md))
    real_unlink = os.unlink
    other: list[subprocess.Popen] = []

    def unlink(path, *a, **kw):
        if not other and str(md) in str(path):  # the first message, after the rename
            other.append(subprocess.Popen(command("maildir2mbox", "maildir2mbox"), env=env,
                                          stderr=subprocess.PIPE))
            try:
                other[0].wait(1.0)  # long enough to do it all, if nothing stops it
            except subprocess.TimeoutExpired:
                pass
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    moved = maildir2mbox(str(md), str(tmp_path / "Mailbox"), str(tmp_path / "Mailbox.tmp"))
    monkeypatch.undo()
    assert moved == 20 and other
    _, err = other[0].communicate(timeout=30)
    assert other[0].returncode == 0, err
    subjects = re.findall(rb"^Subject: (\d+)$", (tmp_path / "Mailbox").read_bytes(), re.M)
    assert sorted(int(n) for n in subjects) == list(range(20))


def wait_for_lock_waiter(inode: int, timeout: float = 15.0) -> None:
    """Wait until some process is blocked on an flock of `inode` (Linux /proc/locks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/locks") as f:
            if any("->" in line and line.split()[-3].endswith(f":{inode}") for line in f):
                return
        time.sleep(0.01)
    raise AssertionError("maildir2mbox never waited for the lock")


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs Linux /proc/locks")
def test_maildir2mbox_that_waited_for_the_lock_uses_the_new_mbox(tmp_path, md):
    import fcntl

    mail = tmp_path / "Mailbox"
    mail.write_bytes(OLD)
    two_messages(md)
    holder = os.open(mail, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    proc = subprocess.Popen(command("maildir2mbox", "maildir2mbox"), stderr=subprocess.PIPE,
                            env=dict(os.environ, **env_for(tmp_path, md)))
    try:
        wait_for_lock_waiter(os.fstat(holder).st_ino)
        # Meanwhile another converter replaces the mbox, as maildir2mbox itself does.
        (tmp_path / "other").write_bytes(OLD + b"From other Thu Jan 01 00:00:00 1970\n\nmoved\n\n")
        os.rename(tmp_path / "other", mail)
    finally:
        os.close(holder)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    text = mail.read_bytes()
    assert text.startswith(OLD + b"From other ") and b"Subject: one" in text and b"Subject: two" in text
    assert os.listdir(md / "new") == []


@pytest.mark.parametrize("missing", ["MAIL", "MAILTMP", "MAILDIR"])
def test_maildir2mbox_needs_its_three_variables(tmp_path, md, missing):
    env = env_for(tmp_path, md)
    del env[missing]
    p = run("maildir2mbox", "maildir2mbox", env=env)
    assert p.returncode == 111
    assert p.stderr.decode() == f"maildir2mbox: fatal: ${missing} is not set\n"
    p = run("maildir2mbox", "maildir2mbox", env=env_for(tmp_path, tmp_path / "none"))
    assert p.returncode == 111 and p.stderr.startswith(b"maildir2mbox: fatal: unable to chdir")


def test_maildir2mbox_streams_large_messages(tmp_path, md):
    size = 48 << 20
    with open(md / "new" / "1.big.host", "wb") as f:
        line = b"From a line that needs quoting, again and again and again.\n"
        for _ in range(size // len(line)):
            f.write(line)
    os.utime(md / "new" / "1.big.host", (T0, T0))
    script = textwrap.dedent(f"""
        import resource
        from miniqmail.maildirmbox import maildir2mbox
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert maildir2mbox({str(md)!r}, {str(tmp_path / 'Mailbox')!r}, {str(tmp_path / 'tmp')!r}) == 1
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert int(p.stdout) < 16 * 1024, f"RSS grew by {p.stdout.strip()} KiB"
    assert os.path.getsize(tmp_path / "Mailbox") > size


# -- maildirwatch ------------------------------------------------------------------------

def test_summary_fields_and_limits():
    message = (b"Return-Path: <s@x>\nDelivered-To: first@y\nDelivered-To: last@y\n"
               b"From: Someone \xc3\xa9 <s@x>\nSubject: hello\n there\n\n" + b"b" * 300)
    s = summarize(io.BytesIO(message))
    assert s.sender == b"<s@x>" and s.recipient == b"last@y"
    assert len(s.text) == TEXT_LIMIT and s.text.startswith(b"hello\n there\nbbb")
    assert s.render(ansi=False) == (b"FROM <s@x> TO <last@y>\nFrom: Someone // <s@x>\n"
                                    b"hello/ there/" + b"b" * (TEXT_LIMIT - 13) + b"\n\n")
    assert s.render(ansi=True).split(b"\n")[1] == b"\033[1mFrom: Someone // <s@x>\033[0m"


def test_summary_without_fields():
    s = summarize(io.BytesIO(b"no header at all\nbody\n"))
    assert s.render(ansi=False) == b"FROM ? TO <?>\nno header at all/body/\n\n"


def watch_env(md):
    return dict(os.environ, MAILDIR=str(md))


def test_maildirwatch_in_a_pipe_prints_one_listing(md):
    put(md, "new", "2.b.host", b"Return-Path: <b@x>\nDelivered-To: me@y\nSubject: second\n\nbody b\n", T0 + 5)
    put(md, "new", "1.a.host", b"Return-Path: <a@x>\nDelivered-To: me@y\nFrom: A <a@x>\nSubject: first\n\n", T0)
    put(md, "cur", "0.c.host:2,S", b"Subject: already seen\n\n", T0)
    p = subprocess.run(command("maildirwatch", "maildirwatch"), capture_output=True,
                       env=watch_env(md), timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout == (b"FROM <a@x> TO <me@y>\nFrom: A <a@x>\nfirst/\n\n"
                        b"FROM <b@x> TO <me@y>\nsecond/body b/\n\n")


def test_maildirwatch_without_maildir_is_111(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MAILDIR"}
    p = subprocess.run(command("maildirwatch", "maildirwatch"), capture_output=True, env=env, timeout=30)
    assert p.returncode == 111 and p.stderr == b"maildirwatch: fatal: $MAILDIR is not set\n"
    p = subprocess.run(command("maildirwatch", "maildirwatch"), capture_output=True,
                       env=watch_env(tmp_path / "none"), timeout=30)
    assert p.returncode == 111 and p.stderr.startswith(b"maildirwatch: fatal: unable to chdir")


def read_until(fd: int, seen: bytearray, needle: bytes, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} on the terminal; got {bytes(seen)!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the program closed the terminal
                chunk = b""
            assert chunk, f"the terminal closed; got {bytes(seen)!r}"
            seen += chunk


@pytest.mark.timeout(60)
def test_maildirwatch_on_a_terminal_refreshes(md):
    put(md, "new", "1.a.host", b"Return-Path: <a@x>\nDelivered-To: me@y\nSubject: first\n\n", T0)
    master, slave = pty.openpty()
    # Ctrl-C as at a terminal: a job a script starts in the background inherits SIGINT
    # ignored (and so would this program, which then rightly ignores it); a handler
    # here is reset to the default in the program.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(command("maildirwatch", "maildirwatch"), stdin=slave, stdout=slave,
                                stderr=slave, env=watch_env(md), start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, inherited)
    os.close(slave)
    seen = bytearray()
    try:
        read_until(master, seen, b"first/")
        assert seen.startswith(CLEAR)
        assert b"\033[1m" not in seen  # no From: field, no bold line
        maildir.deliver(str(md), io.BytesIO(b"Return-Path: <b@x>\nFrom: B <b@x>\nSubject: second\n\n"))
        read_until(master, seen, b"second/")
        second = bytes(seen).rsplit(CLEAR, 1)[1]
        assert b"first/" in second and b"\033[1mFrom: B <b@x>\033[0m" in second
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)
