"""The scheduler end to end: `smarthost run` as a real process delivering through real .qmail files."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from miniqmail import envelope
from smarthost.queue import Queue
from tests.conftest import program, queue_with_program, wait_files

pytestmark = pytest.mark.timeout(120)
ME = "mx.test.invalid"


def home(root):
    return root.sub("home", "example")


def dotqmail(root, ext, text, mode=0o600):
    path = os.path.join(home(root), f".qmail-{ext}" if ext else ".qmail")
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def maildir(path):
    for sub in ("", "tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    return path


def msg(subject, extra=b""):
    return b"From: tester@" + ME.encode() + b"\nSubject: " + subject.encode() + b"\n" + extra + b"\nbody of " + subject.encode() + b"\n"


def test_program_injection_reaches_maildir_mbox_and_program(root, daemon):
    h = home(root)
    dotqmail(root, "all", "# every kind of line\n./Maildir/\n./Mailbox\n|env > prog.env; cat > prog.msg\n")
    d = daemon()
    code = queue_with_program(root, msg("one"), envelope.encode("sender@far.example", [f"example-all@{ME}"]))
    assert code == 0
    d.wait_log(lambda s: "delivery 1: success" in s)
    [path] = wait_files(os.path.join(h, "Maildir", "new"))
    data = open(path, "rb").read()
    assert data.startswith(b"Return-Path: <sender@far.example>\nDelivered-To: example-all@" + ME.encode() + b"\nReceived: (qmail ")
    assert data.endswith(msg("one"))
    mbox = open(os.path.join(h, "Mailbox"), "rb").read()
    assert re.match(rb"From sender@far\.example \w{3} \w{3} \d\d \d\d:\d\d:\d\d \d{4}\nReturn-Path: <sender@far\.example>\n"
                    rb"Delivered-To: example-all@", mbox)
    assert mbox.endswith(msg("one") + b"\n")
    prog_msg = open(os.path.join(h, "prog.msg"), "rb").read()
    assert prog_msg.startswith(b"Received: (qmail ") and prog_msg.endswith(msg("one"))
    env = dict(line.split("=", 1) for line in open(os.path.join(h, "prog.env")).read().splitlines() if "=" in line)
    assert env["SENDER"] == "sender@far.example"
    assert env["RECIPIENT"] == f"example-all@{ME}"
    assert env["LOCAL"] == "example-all" and env["EXT"] == "all" and env["HOST"] == ME
    assert env["USER"] and env["HOME"] == h
    assert env["DTLINE"] == f"Delivered-To: example-all@{ME}"
    assert env["RPLINE"] == "Return-Path: <sender@far.example>"
    d.wait_log(lambda s: s.startswith("end msg "))
    log = "\n".join(d.lines)
    assert re.search(r"^new msg \d+$", log, re.M)
    assert re.search(r"^info msg \d+: bytes \d+ from <sender@far\.example> qp \d+ uid \d+$", log, re.M)
    assert re.search(rf"^starting delivery 1: msg \d+ to local example-all@{ME}$", log, re.M)
    assert re.search(r"^delivery 1: success: did_2\+0\+1/$", log, re.M)


def test_a_program_holds_only_its_message_and_output(root, daemon):
    """Nothing of the daemon's (its event loop's pipes, sockets, the log) reaches a delivery."""
    h = home(root)
    lister = "import os; print(*[f for f in range(1024) if os.path.exists(f'/proc/self/fd/{f}')])"
    dotqmail(root, "fds", f'|exec {sys.executable} -c "{lister}" >fds.out\n')
    d = daemon()
    Queue(root.queue_dir).inject(msg("fds"), "sender@far.example", [f"example-fds@{ME}"])
    d.wait_log(lambda s: "delivery 1: success" in s)
    assert open(os.path.join(h, "fds.out")).read().split() == ["0", "1", "2"]


def test_api_injection_and_forward(root, daemon):
    maildir(os.path.join(home(root), "fwd"))
    dotqmail(root, "fwd", "./fwd/\n")
    dotqmail(root, "list", f"&example-fwd@{ME}\n")
    d = daemon()
    q = Queue(root.queue_dir)
    q.inject(msg("api"), "a@far.example", [f"example-list@{ME}"])
    [path] = wait_files(os.path.join(home(root), "fwd", "new"))
    data = open(path, "rb").read()
    # the forwarded copy carries both Delivered-To lines, newest first, and the original sender
    assert data.startswith(b"Return-Path: <a@far.example>\nDelivered-To: example-fwd@" + ME.encode()
                           + b"\nReceived: (qmail ")
    assert b"\nDelivered-To: example-list@" + ME.encode() + b"\n" in data
    assert data.endswith(msg("api"))
    d.wait_log("success: did_0+1+0/qp_")


def test_loop_bounces(root, daemon):
    dotqmail(root, "loop", f"&example-loop@{ME}\n")
    maildir(os.path.join(home(root), "bounces"))
    dotqmail(root, "bounces", "./bounces/\n")
    d = daemon()
    Queue(root.queue_dir).inject(msg("loop"), f"example-bounces@{ME}", [f"example-loop@{ME}"])
    d.wait_log("failure: This_message_is_looping")
    [path] = wait_files(os.path.join(home(root), "bounces", "new"))
    assert b"Subject: failure notice" in open(path, "rb").read()


def test_temporary_failure_is_retried_and_permanent_bounces(root, daemon):
    h = home(root)
    flag = os.path.join(h, "ok")
    dotqmail(root, "flaky", f"|test -f {flag} && cat > flaky.out && exit 0; echo not yet; exit 111\n")
    dotqmail(root, "hard", "|echo no such thing here; exit 100\n")
    maildir(os.path.join(h, "bounces"))
    dotqmail(root, "bounces", "./bounces/\n")
    d = daemon()
    q = Queue(root.queue_dir)
    q.inject(msg("flaky"), f"example-bounces@{ME}", [f"example-flaky@{ME}"])
    d.wait_log("deferral: not_yet/")
    # on its schedule the next pass is 100 s away; SIGALRM makes it due now
    open(flag, "w").close()
    d.signal(signal.SIGALRM)
    d.wait_log(lambda s: "success: " in s)
    assert open(os.path.join(h, "flaky.out"), "rb").read().endswith(msg("flaky"))

    n = q.inject(msg("hard"), f"example-bounces@{ME}", [f"example-hard@{ME}"]).id
    d.wait_log(f"bounce msg {n} qp")
    [path] = wait_files(os.path.join(h, "bounces", "new"))
    text = open(path, "rb").read().decode()
    header, body = text.split("\n\n", 1)
    assert "Return-Path: <>" in header
    assert f"From: MAILER-DAEMON@{ME}" in header and f"To: example-bounces@{ME}" in header
    assert "Subject: failure notice" in header
    paras = body.split("\n\n")
    assert paras[0].startswith("Hi. This is the qmail-send program at")
    assert paras[1].startswith(f"<example-hard@{ME}>:\n") and "no such thing here" in paras[1]
    assert paras[2].startswith("--- ")
    assert f"Return-Path: <example-bounces@{ME}>" in body and body.endswith(msg("hard").decode())


def test_double_bounce_goes_to_postmaster_and_triple_is_dropped(root, daemon):
    dotqmail(root, "hard", "|exit 100\n")
    d = daemon()
    q = Queue(root.queue_dir)
    q.inject(msg("null sender"), "", [f"example-hard@{ME}"])
    [path] = wait_files(os.path.join(root.alias_dir, "Maildir", "new"))
    data = open(path, "rb").read()
    assert data.startswith(b"Return-Path: <#@[]>\nDelivered-To: postmaster@" + ME.encode())
    n = q.inject(msg("triple"), "#@[]", [f"example-hard@{ME}"]).id
    d.wait_log(f"triple bounce: discarding bounce/{n}")
    d.wait_log(f"end msg {n}")


def test_unknown_user_bounces_no_mailbox(root, daemon):
    maildir(os.path.join(home(root), "bounces"))
    dotqmail(root, "bounces", "./bounces/\n")
    d = daemon()
    Queue(root.queue_dir).inject(msg("nobody"), f"example-bounces@{ME}", [f"example-nosuch@{ME}"])
    d.wait_log("failure: Sorry,_no_mailbox_here_by_that_name._(#5.1.1)/")


@pytest.mark.parametrize("problem", ["missing-maildir", "writable-home", "bad-dotqmail"])
def test_local_trouble_defers_and_keeps_the_message(root, daemon, problem):
    h = home(root)
    if problem == "missing-maildir":
        dotqmail(root, "x", "./nonexistent/\n")
    elif problem == "writable-home":
        dotqmail(root, "x", "./Maildir/\n")
        os.chmod(h, 0o777)
    else:
        dotqmail(root, "x", "./Maildir/\n", mode=0o666)  # world-writable .qmail
    d = daemon()
    n = Queue(root.queue_dir).inject(msg("trouble"), "s@far.example", [f"example-x@{ME}"]).id
    line = d.wait_log("delivery 1: deferral: ")
    assert "(#4." in line
    assert d.proc.poll() is None
    out = subprocess.run([program("qmail-qread")], env=dict(os.environ, SMARTHOST_ROOT=root.path),
                         capture_output=True, text=True).stdout
    assert f"#{n}" in out and f"\tlocal\texample-x@{ME}" in out
    os.chmod(h, 0o755)


def test_remote_recipients_are_deferred_never_dropped(root, daemon):
    d = daemon()
    n = Queue(root.queue_dir).inject(msg("far"), "s@x", ["someone@far.example", f"example@{ME}"]).id
    d.wait_log("to remote someone@far.example")
    d.wait_log("deferral: Sorry,_I_wasn't_able_to_establish_an_SMTP_connection")
    d.wait_log(lambda s: "success" in s)
    env = dict(os.environ, SMARTHOST_ROOT=root.path)
    out = subprocess.run([program("qmail-qread")], env=env, capture_output=True, text=True).stdout
    lines = out.splitlines()
    assert re.match(rf"\d+ \w+ \d{{4}} \d\d:\d\d:\d\d GMT  #{n}  \d+  <s@x> $", lines[0])
    assert "\tremote\tsomeone@far.example" in lines
    stat = subprocess.run([program("qmail-qstat")], env=env, capture_output=True, text=True).stdout
    assert stat == "messages in queue: 1\nmessages in queue but not yet preprocessed: 0\n"


def test_hup_rereads_locals_and_term_exits(root, daemon):
    d = daemon()
    q = Queue(root.queue_dir)
    with open(os.path.join(root.control_dir, "locals"), "a") as f:
        f.write("added.example\n")
    with open(os.path.join(root.control_dir, "virtualdomains"), "w") as f:
        f.write("added.example:example\n")
    d.signal(signal.SIGHUP)
    time.sleep(0.3)
    q.inject(msg("hup"), "s@x", ["example@added.example"])
    d.wait_log("to local example@added.example")
    d.wait_log(lambda s: s.startswith("end msg"))
    assert d.stop() == 0
    assert d.lines[-1] == "status: exiting"


def test_second_scheduler_refuses_to_start(root, daemon):
    daemon()
    p = subprocess.run([program("smarthost"), "run", "--root", root.path], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "already running" in p.stderr


def test_messages_queued_while_down_are_delivered_at_start(root, daemon):
    q = Queue(root.queue_dir)
    for i in range(5):
        q.inject(msg(f"early {i}"), "s@x", [f"example@{ME}"])
    daemon()
    wait_files(os.path.join(home(root), "Maildir", "new"), 5)


def test_retry_time_is_on_the_schedule(root, daemon):
    dotqmail(root, "later", "|exit 111\n")
    d = daemon()
    q = Queue(root.queue_dir)
    n = q.inject(msg("later"), "s@x", [f"example-later@{ME}"]).id
    d.wait_log("delivery 1: deferral")
    d.wait_log(lambda s: s.startswith("status: local 0/"))
    time.sleep(0.2)
    birth = os.stat(q.info(n)).st_mtime
    # the first local pass starts at age ~0: the next one is due at birth + 10^2
    assert abs(os.stat(q.channel("local", n)).st_mtime - (birth + 100)) < 2


def test_queuelifetime_turns_the_last_deferral_into_a_bounce(root, daemon):
    with open(os.path.join(root.control_dir, "queuelifetime"), "w") as f:
        f.write("0\n")
    maildir(os.path.join(home(root), "bounces"))
    dotqmail(root, "bounces", "./bounces/\n")
    d = daemon()
    time.sleep(1.1)  # birth and the first pass must differ by a second for "older than 0 s"
    q = Queue(root.queue_dir)
    q.inject(msg("old"), f"example-bounces@{ME}", ["far@remote.example"])
    d.wait_log("delivery 1: failure: ")
    [path] = wait_files(os.path.join(home(root), "bounces", "new"))
    text = open(path, "rb").read().decode()
    assert "<far@remote.example>:" in text and "in the queue too long" in text


def test_term_finishes_deliveries_under_way(root, daemon):
    dotqmail(root, "slow", "|sleep 1; cat > slow.out\n")
    d = daemon()
    Queue(root.queue_dir).inject(msg("slow"), "s@x", [f"example-slow@{ME}"])
    d.wait_log("starting delivery 1")
    d.signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    assert any("delivery 1: success" in s for s in d.lines)
    assert d.lines[-1] == "status: exiting"
    assert os.path.exists(os.path.join(home(root), "slow.out"))


def test_restart_does_not_repeat_finished_recipients(root, daemon):
    dotqmail(root, "later", "|exit 111\n")
    d = daemon()
    q = Queue(root.queue_dir)
    n = q.inject(msg("half"), "s@x", [f"example@{ME}", f"example-later@{ME}"]).id
    d.wait_log("deferral")
    d.wait_log("success")
    new = os.path.join(home(root), "Maildir", "new")
    wait_files(new, 1)
    assert d.stop() == 0
    # the deferred recipient's state is on disk, qmail's way, and todo/N is gone
    assert q.todo_ids() == [] and os.path.exists(q.info(n))
    assert open(q.channel("local", n), "rb").read().count(b"T") == 1
    d2 = daemon()
    d2.signal(signal.SIGALRM)
    d2.wait_log("delivery 1: deferral")
    assert len(os.listdir(new)) == 1


def spawners(daemon_pid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(daemon_pid), "-f", "smarthost.lspawn"],
                                           capture_output=True, text=True).stdout.split()]


def test_a_spawner_that_dies_costs_no_delivery_and_is_replaced(root, daemon):
    """The scheduler talks to the delivery children itself: a spawner killed while a
    delivery is under way loses nothing, and the next child comes from a new spawner."""
    dotqmail(root, "slow", "|sleep 1\n")
    d = daemon()
    q = Queue(root.queue_dir)
    q.inject(msg("caught"), "sender@far.example", [f"example-slow@{ME}"])
    d.wait_log("starting delivery 1:")
    [spawner] = spawners(d.proc.pid)
    os.kill(spawner, signal.SIGKILL)
    d.wait_log("delivery 1: success")
    # two at once: one child is idle, the other must be forked by a new spawner
    q.inject(msg("after"), "sender@far.example", [f"example-slow@{ME}", f"example@{ME}"])
    d.wait_log("delivery 2: success")
    d.wait_log("delivery 3: success")
    [path] = wait_files(os.path.join(home(root), "Maildir", "new"))
    assert open(path, "rb").read().endswith(msg("after"))
    assert spawners(d.proc.pid) not in ([], [spawner])
    assert d.proc.poll() is None
