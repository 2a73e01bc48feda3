"""The queue: qmail's layout, the injection order, recovery from a crash at each step, qmail-queue."""

import asyncio
import errno
import io
import os
import re
import select
import signal
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from miniqmail import envelope
from miniqmail.exitcodes import QQ
from smarthost.errors import PermanentError
from smarthost.queue import Queue, QueueError, commit_group, trigger_ids
from tests.conftest import queue_with_program


@pytest.fixture
def q(tmp_path):
    queue = Queue(str(tmp_path / "queue"))
    queue.create()
    return queue


def test_layout_is_qmails(q):
    for d in ("pid", "intd", "todo", "bounce", "lock"):
        assert os.path.isdir(q.sub(d))
    for d in ("mess", "info", "local", "remote"):
        assert sorted(os.listdir(q.sub(d)), key=int) == [str(i) for i in range(23)]
    assert os.path.exists(q.sub("lock", "sendmutex"))
    import stat
    assert stat.S_ISFIFO(os.stat(q.trigger).st_mode)


def test_inject_writes_mess_and_todo_named_by_inode(q):
    done = q.inject(io.BytesIO(b"Subject: hi\n\nbody\n"), "a@b.example", ["c@d.example", "e@f"])
    n = done.id
    assert os.stat(q.mess(n)).st_ino == n
    assert q.mess(n).endswith(f"mess/{n % 23}/{n}")
    mess = open(q.mess(n), "rb").read()
    assert re.match(rb"Received: \(qmail \d+ invoked by uid \d+\); \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d -0000\n"
                    rb"Subject: hi\n\nbody\n$", mess)
    todo = open(q.todo(n), "rb").read()
    head = b"u%d\0p%d\0Fa@b.example\0Tc@d.example\0Te@f\0" % (os.getuid(), done.qp)
    # qmail's records, then the check record: the message's length and CRC-32, the records'
    # CRC-32, the message's number
    assert todo == head + b"c%d %08x %08x %d\0" % (len(mess), zlib.crc32(mess), zlib.crc32(head), n)
    assert q.todo_ids() == [n]
    assert os.listdir(q.sub("pid")) == []


def test_trigger_is_poked_with_the_id_queued(q):
    fd = os.open(q.trigger, os.O_RDONLY | os.O_NONBLOCK)
    try:
        n = q.inject(b"x\n", "", ["a@b"]).id
        assert os.read(fd, 100) == b"%d\n" % n
        q.poke()
        assert os.read(fd, 100) == b"\0"  # qmail's poke: "list todo/"
        q.poke(range(10**15, 10**15 + 1000))  # more than one atomic write can hold
        assert os.read(fd, 100_000) == b"\0"
    finally:
        os.close(fd)


def test_trigger_ids_reads_what_pokes_wrote():
    cap = 65536
    assert trigger_ids(b"12\n7\n12\n", cap) == [12, 7, 12]
    for scan in (b"", b"\0", b"12\n\0", b"\012\n", b"12", b"12\n\n", b"1 2\n", b"-1\n",
                 b"\xd9\xa3\n", b"1" * 21 + b"\n"):
        assert trigger_ids(scan, cap) is None, scan
    # Near the fifo's capacity a poke may have found it full and been lost: list todo/.
    near = b"1\n" * ((cap - select.PIPE_BUF) // 2)
    assert trigger_ids(near, cap) == [1] * len(near[::2])
    assert trigger_ids(near + b"1\n", cap) is None
    assert trigger_ids(b"1\n", 0) is None  # capacity unknown


@given(st.lists(st.integers(0, 2**64), max_size=300), st.binary(max_size=40))
def test_trigger_ids_property(ids, junk):
    data = b"".join(b"%d\n" % n for n in ids)
    assert trigger_ids(data, 65536) == (ids or None)
    got = trigger_ids(data + junk, 65536)
    assert got is None or all(isinstance(n, int) and n >= 0 for n in got)
    if junk and not junk.endswith(b"\n"):
        assert got is None


def test_bad_addresses_are_permanent_and_leave_nothing(q):
    with pytest.raises(PermanentError) as e:
        q.inject(b"x\n", "a@b", ["x" * 2000])
    assert e.value.exit_code == QQ.ADDRESS_TOO_LONG
    with pytest.raises(PermanentError) as e:
        q.inject(b"x\n", "a@b", ["evil@b\nRCPT TO:<x@y>"])
    assert e.value.exit_code == QQ.PERM_REFUSED
    assert q.mess_ids() == [] and q.todo_ids() == []


class Broken(io.RawIOBase):
    def readable(self):
        return True

    def readinto(self, b):
        raise OSError(5, "Input/output error")


def test_read_error_mid_message_leaves_nothing(q):
    with pytest.raises(QueueError) as e:
        q.inject(Broken(), "a@b", ["c@d"])
    assert e.value.exit_code == QQ.READ
    assert q.mess_ids() == [] and q.todo_ids() == [] and os.listdir(q.sub("intd")) == []


def _die_in_child(fn):
    """Run fn in a forked child that then dies by SIGKILL, as a crash would."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)


@pytest.mark.parametrize("step", ["mess", "intd", "before-link"])
def test_crash_before_commit_is_invisible_and_cleaned(q, step):
    def crash():
        d = q.draft()
        d.write(b"Subject: half\n")
        if step == "mess":
            return
        n = d.id
        fd, _ = q._create_intd(n)
        q._write_intd(fd, n, 0, 1, b"a@b", [b"c@d"], (14, 0))
        os.close(fd)
        if step == "intd":
            return
        os.fsync(d._fd)

    _die_in_child(crash)
    assert q.todo_ids() == []          # nothing the scheduler would read
    assert len(q.mess_ids()) == 1      # but a leftover
    removed = q.cleanup()
    assert len(removed) == 1
    assert q.mess_ids() == [] and os.listdir(q.sub("intd")) == []


def test_cleanup_spares_an_injection_under_way(q):
    d = q.draft()
    try:
        d.write(b"Subject: in progress\n")
        assert q.cleanup() == []
        assert q.mess_ids() == [d.id]
        d.commit("a@b", ["c@d"])
    finally:
        d.close()
    assert q.cleanup() == []
    assert q.todo_ids() == [d.id]


def test_committed_message_survives_a_crash_right_after(q):
    def crash():
        q.inject(b"Subject: kept\n", "a@b", ["c@d"])

    _die_in_child(crash)
    assert len(q.todo_ids()) == 1
    assert q.cleanup() == []


def test_the_scheduler_may_finish_a_message_before_its_injection_returns(q, monkeypatch):
    """Once todo/N exists the scheduler may deliver it and remove its files at
    once, before the injection's last fsync: the injection still succeeds."""
    real_link = os.link

    def link_then_deliver(src, dst, *a, **kw):
        real_link(src, dst, *a, **kw)
        if "/todo/" in str(dst):  # what Scheduler.finish() does, at the worst moment
            n = int(os.path.basename(dst))
            for p in (q.todo(n), q.intd(n)):
                os.unlink(p)

    monkeypatch.setattr(os, "link", link_then_deliver)
    done = q.inject(b"Subject: raced\n\nx\n", "a@b.example", ["c@d.example"])
    monkeypatch.undo()
    assert done.id > 0
    assert q.todo_ids() == [] and not os.path.exists(q.intd(done.id))


def test_many_concurrent_injections_get_distinct_ids(q):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as ex:
        ids = list(ex.map(lambda i: q.inject(b"m %d\n" % i, "a@b", ["c@d"]).id, range(200)))
    assert len(set(ids)) == 200
    assert q.todo_ids() == sorted(ids)


# -- the qmail-queue program ---------------------------------------------------------------

def test_qmail_queue_program_queues(root):
    code = queue_with_program(root, b"Subject: prog\n\nhello\n", envelope.encode("s@x", ["r@y"]))
    assert code == 0
    q = Queue(root.queue_dir)
    [n] = q.todo_ids()
    assert b"\0Fs@x\0Tr@y\0c" in open(q.todo(n), "rb").read()
    assert open(q.mess(n), "rb").read().endswith(b"\nSubject: prog\n\nhello\n")


def test_qmail_queue_large_message_before_envelope(root):
    # The message is read first: a caller writing 5 MB before the envelope must not deadlock.
    body = b"Subject: big\n\n" + (b"x" * 99 + b"\n") * 50000
    assert queue_with_program(root, body, envelope.encode("s@x", ["r@y"])) == 0


@pytest.mark.parametrize("env_bytes,code", [
    (b"Fs@x\0Tr@y\0", QQ.ENVELOPE),             # EOF before the final NUL
    (b"Xs@x\0\0", QQ.ENVELOPE),                 # not F first
    (b"Fs@x\0Qr@y\0\0", QQ.ENVELOPE),           # not T after
    (b"Fs@x\0T" + b"r" * 1100 + b"\0\0", QQ.ADDRESS_TOO_LONG),
    (b"Fs@x\0Tr@y\nDATA\0\0", QQ.PERM_REFUSED),  # a newline in an address
    (None, QQ.READ),                             # no fd 1 at all
])
def test_qmail_queue_refuses_broken_envelopes(root, env_bytes, code):
    assert queue_with_program(root, b"Subject: x\n\n", env_bytes) == code
    q = Queue(root.queue_dir)
    assert q.todo_ids() == [] and q.mess_ids() == []


def test_qmail_queue_without_a_queue_is_62(tmp_path):
    class R:
        path = str(tmp_path)
    assert queue_with_program(R, b"x\n", envelope.encode("a", ["b"])) == QQ.QUEUE


def test_qmail_queue_full_disk_is_temporary(root):
    # /dev/full answers every write with ENOSPC; a queue whose mess files land
    # there is what a full disk looks like to qmail-queue.
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    q = Queue(root.queue_dir)
    d = q.draft()
    try:
        os.dup2(os.open("/dev/full", os.O_WRONLY), d._fd)
        with pytest.raises(QueueError) as e:
            d.write(b"x" * 100000)
        assert e.value.exit_code == QQ.WRITE
    finally:
        d.close()
    assert q.todo_ids() == [] and q.mess_ids() == []


def test_cleanup_spares_a_fresh_pid_file_and_removes_an_old_one(q):
    # an injector between its O_EXCL create of pid/P and the link holds no lock yet
    fresh = q.sub("pid", "1.2.3.4")
    old = q.sub("pid", "5.6.7.8")
    for p in (fresh, old):
        open(p, "w").close()
    os.utime(old, (1, 1))
    q.cleanup()
    assert os.path.exists(fresh) and not os.path.exists(old)


@pytest.mark.parametrize("envelope_bytes", [b"", b"u0\0p1\0", b"u0\0p1\0Fa@b\0Tc@"])
def test_envelope_cut_short_by_a_crash_is_removed(root, envelope_bytes):
    # a crash between the todo link and the envelope's fsync can leave this; the
    # client was never told "queued", so the entry goes instead of blocking todo/
    from smarthost.rewrite import Routing
    from smarthost.sendqueue import IncompleteTodo, SendQueue

    q = Queue(root.queue_dir)
    d = q.draft()
    d.write(b"Subject: cut\n")
    os.fsync(d._fd)
    n = d.id
    with open(q.intd(n), "wb") as f:
        f.write(envelope_bytes)
    os.link(q.intd(n), q.todo(n))
    d._done = True
    d.close()
    sq = SendQueue(q)
    with pytest.raises(IncompleteTodo):
        sq.preprocess(n, Routing.from_control(root.control))
    sq.discard_incomplete(n)
    assert q.todo_ids() == [] and q.mess_ids() == [] and os.listdir(q.sub("intd")) == []


def test_filesystem_type_reads_the_mount_table(tmp_path):
    from smarthost.queue import FSYNC_COVERS_LINKS, filesystem_type

    assert filesystem_type("/proc/self") == "proc"
    kind = filesystem_type(str(tmp_path))
    assert kind  # some type, whatever /tmp is here
    q = Queue(str(tmp_path / "queue"))
    assert q.file_fsync_covers_links == (kind in FSYNC_COVERS_LINKS)


@pytest.mark.parametrize("side_by_side", [False, True], ids=["in-turn", "side-by-side"])
def test_commit_group_commits_each_and_keeps_a_failure_to_itself(q, side_by_side):
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(4)
    drafts = [q.draft() for _ in range(4)]
    for i, d in enumerate(drafts):
        d.write(b"Subject: %d\n\nx\n" % i)
        d.stage("a@b.example", [f"r{i}@c.example"])
    bad = drafts[2]
    with open(q.todo(bad.id), "wb"):  # something in the way of its commit point
        pass
    fd = os.open(q.trigger, os.O_RDONLY | os.O_NONBLOCK)
    try:
        got = commit_group(drafts, pool.map) if side_by_side else commit_group(drafts)
        assert os.read(fd, 10) == b""  # nothing: the caller pokes, once it has answered
    finally:
        os.close(fd)
        pool.shutdown()
    assert isinstance(got[2], QueueError) and got[2].exit_code == QQ.TODO
    for d in drafts:
        d.close()
    for i, (d, r) in enumerate(zip(drafts, got)):
        if d is bad:
            assert not os.path.exists(d.path) and not os.path.exists(q.intd(d.id))
            continue
        assert (r.id, r.qp) == (d.id, d.qp) and d.injected == r
        head = b"u%d\0p%d\0Fa@b.example\0Tr%d@c.example\0" % (os.getuid(), r.qp, i)
        assert open(q.todo(r.id), "rb").read().startswith(head)
        assert open(q.mess(r.id), "rb").read() == b"Subject: %d\n\nx\n" % i
    assert q.mess_ids() == sorted(d.id for d in drafts if d is not bad)


# -- one flush on the way to "queued": the check record and what start-up makes of it ----------

@pytest.mark.parametrize("aio", [True, False], ids=["aio", "threads"])
def test_a_lone_commit_waits_for_its_fsyncs_side_by_side(q, monkeypatch, aio):
    """The message's and the envelope's fsyncs run at once (one cache flush to wait for,
    not two in a row), and only after the todo link; the commit returns after both.
    With Linux AIO one thread submits both; elsewhere a second thread takes one."""
    import threading

    from smarthost import aiofsync

    if not aio:
        monkeypatch.setattr(aiofsync, "fsync_all", lambda fds: None)
    elif aiofsync.fsync_all([]) is None and not aiofsync._numbers:
        pytest.skip(f"no AIO fsync on {os.uname().machine}")

    lock = threading.Lock()
    order: list[str] = []
    inflight = most = 0
    real_fsync = os.fsync

    def fsync(fd):
        nonlocal inflight, most
        name = "mess" if os.fstat(fd).st_ino in q.mess_ids() else "intd"
        with lock:
            order.append(("todo linked " if q.todo_ids() else "no todo ") + name)
            inflight += 1
            most = max(most, inflight)
        try:
            threading.Event().wait(0.05)
            return real_fsync(fd)
        finally:
            with lock:
                inflight -= 1

    if aio:
        submitted = []
        real_all = aiofsync.fsync_all

        def fsync_all(fds):
            assert q.todo_ids()  # after the link
            submitted.append(sorted("mess" if os.fstat(fd).st_ino in q.mess_ids() else "intd" for fd in fds))
            return real_all(fds)

        monkeypatch.setattr(aiofsync, "fsync_all", fsync_all)
        q.inject(b"Subject: two at once\n", "a@b", ["c@d"])
        monkeypatch.undo()
        assert submitted == [["intd", "mess"]]
        return
    monkeypatch.setattr(os, "fsync", fsync)
    q.inject(b"Subject: two at once\n", "a@b", ["c@d"])
    monkeypatch.undo()
    assert sorted(order) == ["todo linked intd", "todo linked mess"]
    assert most == 2


def test_a_failed_fsync_queues_nothing(q, monkeypatch):
    from smarthost import aiofsync

    monkeypatch.setattr(aiofsync, "fsync_all", lambda fds: None)  # the fsyncs this test fails
    real_fsync = os.fsync

    def fsync(fd):
        if os.fstat(fd).st_ino in q.mess_ids():
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(QueueError) as e:
        q.inject(b"Subject: lost\n", "a@b", ["c@d"])
    monkeypatch.undo()
    assert e.value.exit_code == QQ.WRITE and "Input/output error" in str(e.value)
    assert q.todo_ids() == [] and q.mess_ids() == [] and os.listdir(q.sub("intd")) == []


def _committed(q, body=b"Subject: kept\n\nbody\n"):
    n = q.inject(body, "a@b.example", ["c@d.example"], received=b"").id
    return n, open(q.todo(n), "rb").read()


def test_split_check_returns_the_records_and_the_message_check(q):
    from smarthost.queue import message_check, split_check

    n, env = _committed(q)
    head, check = split_check(env)
    assert head == b"u%d\0p%d\0Fa@b.example\0Tc@d.example\0" % (os.getuid(), os.getpid())
    fd = os.open(q.mess(n), os.O_RDONLY)
    try:
        assert check == message_check(fd) == (20, zlib.crc32(b"Subject: kept\n\nbody\n"))
    finally:
        os.close(fd)
    assert split_check(head) == (head, None)  # an envelope of an older queue: no check to make


@given(st.binary(max_size=200), st.integers(0, 10**6), st.binary(max_size=300), st.booleans(),
       st.integers(0, 2**64))
def test_split_check_tells_every_envelope_a_crash_cut_short(tail, cut, stale, short, n):
    """A crash leaves a prefix of the envelope and then nothing (a short file) or
    whatever the disk block held before (zeros, another file's bytes): with the
    check record required (the file's mode says so), every such envelope is told,
    unless what is left says all the whole one says (a tear in its last field only)."""
    from smarthost.queue import TornEntry, check_record, split_check

    head = b"u0\0p1\0Fa@b\0T" + tail.replace(b"\0", b"x") + b"\0"
    env = head + check_record(10, 0x1234, head, n)
    assert split_check(env, required=True, n=n) == (head, (10, 0x1234))
    i = cut % len(env)
    torn = env[:i] if short else env[:i] + (stale + b"\0" * len(env))[:len(env) - i]
    try:
        told = split_check(torn, required=True, n=n)
    except TornEntry:
        return
    assert told == (head, (10, 0x1234))


def test_split_check_tells_another_messages_envelope():
    """A reused intd file whose new envelope a crash lost still holds the envelope of
    the message it served before: its number tells it, even beside the same message."""
    from smarthost.queue import TornEntry, check_record, split_check

    head = b"u0\0p1\0Fa@b\0Tc@d\0"
    env = head + check_record(10, 0x1234, head, 5)
    assert split_check(env, required=True, n=5) == (head, (10, 0x1234))
    assert split_check(env, required=True) == (head, (10, 0x1234))
    with pytest.raises(TornEntry, match="another message"):
        split_check(env, required=True, n=6)
    older = head + b"c10 00001234 %08x\0" % zlib.crc32(head)  # before records had the number
    assert split_check(older, required=True, n=6) == (head, (10, 0x1234))


@given(st.binary(max_size=300), st.booleans())
def test_split_check_never_fails_otherwise(data, required):
    from smarthost.queue import TornEntry, split_check

    try:
        head, check = split_check(data, required)
    except TornEntry:
        return
    assert (check is None and head == data) or data.startswith(head)


def _tear(path, how):
    data = open(path, "rb").read()
    with open(path, "r+b") as f:
        if how == "zeros":     # the inode made it to the disk, the data block did not
            f.write(b"\0" * len(data))
        elif how == "stale":   # a block that held something else before
            f.write(b"X" * len(data))
        elif how == "short":
            f.truncate(len(data) // 2)
        elif how == "zero-tail":
            f.seek(len(data) // 2)
            f.write(b"\0" * (len(data) - len(data) // 2))


@pytest.mark.parametrize("what,how", [("mess", "zeros"), ("mess", "stale"), ("mess", "short"),
                                      ("todo", "zero-tail"), ("todo", "stale")])
def test_an_entry_a_crash_cut_short_is_found_by_a_listing(root, what, how):
    from smarthost.rewrite import Routing
    from smarthost.sendqueue import IncompleteTodo, SendQueue

    q = Queue(root.queue_dir)
    n, _ = _committed(q)
    _tear(q.mess(n) if what == "mess" else q.todo(n), how)
    sq = SendQueue(q)
    routing = Routing.from_control(root.control)
    with pytest.raises(IncompleteTodo):
        sq.preprocess(n, routing, listed=True)
    sq.discard_incomplete(n)
    assert q.todo_ids() == [] and q.mess_ids() == []


def test_a_listing_skips_an_injection_under_way_and_marks_what_it_takes_unsure(root):
    from smarthost.rewrite import Routing
    from smarthost.sendqueue import InjectionUnderWay, SendQueue

    q = Queue(root.queue_dir)
    sq = SendQueue(q)
    routing = Routing.from_control(root.control)
    d = q.draft()
    try:
        d.write(b"Subject: under way\n")
        d.stage("a@b.example", ["c@d.example"])
        d.link()  # todo/N is there, its fsyncs are not over
        with pytest.raises(InjectionUnderWay):
            sq.preprocess(d.id, routing, listed=True)
        named = sq.preprocess(d.id, routing)  # a poke named it: its injector is done
        assert not named.unsure
        calls = d.syncs()
        d.settle(calls, [None] * len(calls))
    finally:
        d.close()
    listed = sq.preprocess(d.id, routing, listed=True)
    assert listed.unsure and listed.size == len(b"Subject: under way\n")


def test_a_persist_makes_an_unsure_message_durable_before_todo_goes(root, monkeypatch):
    from smarthost.rewrite import Routing
    from smarthost.sendqueue import SendQueue

    q = Queue(root.queue_dir)
    sq = SendQueue(q)
    routing = Routing.from_control(root.control)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append("mess" if os.fstat(fd).st_ino in q.mess_ids() else "other")
        return real_fsync(fd)

    for listed in (False, True):
        n, _ = _committed(q)
        msg = sq.preprocess(n, routing, listed=listed)
        synced.clear()
        monkeypatch.setattr(os, "fsync", fsync)
        sq.write_snapshot(msg, sq.snapshot(msg))
        monkeypatch.undo()
        assert synced == (["mess"] if listed else []) + ["other"] * (len(synced) - listed)
        assert not os.path.exists(q.todo(n))


def test_start_up_removes_what_a_crash_cut_short_and_delivers_the_rest(root):
    from tests.conftest import Daemon

    q = Queue(root.queue_dir)
    me = open(root.sub("control", "me")).read().strip()
    good = q.inject(b"Subject: intact\n\nx\n", "a@b.example", [f"example@{me}"], trigger=False).id
    torn = q.inject(b"Subject: torn\n\nx\n", "a@b.example", [f"example@{me}"], trigger=False).id
    _tear(q.mess(torn), "zeros")
    d = Daemon(root)
    try:
        d.wait_log(f"warning: removed todo/{torn}: the_message_is_not_what_the_check_record_says")
        d.wait_log(f"end msg {good}")
        new = root.sub("home", "example", "Maildir", "new")
        [name] = os.listdir(new)
        assert b"Subject: intact" in open(os.path.join(new, name), "rb").read()
        assert q.todo_ids() == [] and q.mess_ids() == []
    finally:
        assert d.stop() == 0


def test_aio_fsync_syncs_all_or_leaves_them_to_the_caller(tmp_path):
    from smarthost import aiofsync

    if not aiofsync._numbers:
        pytest.skip(f"no AIO fsync on {os.uname().machine}")
    fds = [os.open(tmp_path / f"f{i}", os.O_CREAT | os.O_WRONLY) for i in range(3)]
    r, w = os.pipe()  # a pipe cannot be fsynced: the kernel refuses it at submission
    try:
        for fd in fds:
            os.write(fd, b"data")
        got = aiofsync.fsync_all(fds)
        if got is None:
            pytest.skip("this kernel refuses AIO fsync")
        assert got == [None, None, None]
        assert aiofsync.fsync_all([fds[0], r]) is None  # partly refused: the caller syncs all
        assert aiofsync.fsync_all(fds[:2]) == [None, None]  # and the next call works
        assert aiofsync.fsync_all([]) is None and aiofsync.fsync_all(list(range(aiofsync.MAX_EVENTS + 1))) is None
    finally:
        for fd in fds + [r, w]:
            os.close(fd)


def test_loop_aio_fsyncs_settle_futures_from_the_event_loop(tmp_path):
    """LoopFsyncs: fsyncs of a file and a directory end as futures the loop settles; a
    descriptor the kernel refuses fails alone once AIO has proven to work, and makes it
    step aside (None, nothing started) before; close() waits for what is under way."""
    from smarthost import aiofsync
    from tests.conftest import aio_fsync_works

    if not aio_fsync_works():
        pytest.skip("this kernel takes no AIO fsync from an event loop")
    f = os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY)
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    r, w = os.pipe()  # a pipe cannot be fsynced: the kernel refuses it at submission

    async def scenario():
        loop = asyncio.get_running_loop()
        first = aiofsync.LoopFsyncs.open(loop)
        assert first.fsync([r]) is None and first.ctx is None   # never worked: step aside

        kernel = aiofsync.LoopFsyncs.open(loop)
        os.write(f, b"data")
        assert await asyncio.wait_for(asyncio.gather(*kernel.fsync([f, d])), 10) == [None, None]
        ok, refused = kernel.fsync([f, r])
        assert await asyncio.wait_for(ok, 10) is None
        with pytest.raises(OSError) as e:
            await refused
        assert e.value.errno == errno.EINVAL
        assert kernel.fsync([f] * (kernel.DEPTH + 1)) is None   # more than it may have under way

        under_way = kernel.fsync([f, d])
        kernel.close()   # waits for them: settled, not cancelled
        assert [fut.result() for fut in under_way] == [None, None]
        assert kernel.fsync([f]) is None and not kernel.pending

    try:
        asyncio.run(scenario())
    finally:
        for fd in (f, d, r, w):
            os.close(fd)


def _finished(q, ns, size=0):
    """Finish messages `ns` as the scheduler does: their files go to spare/ while it has room."""
    from smarthost.sendqueue import Message, SendQueue

    return SendQueue(q).finish_all([Message(n, 0.0, "a@b.example", size) for n in ns])


def test_finished_files_are_kept_as_spares_and_rewritten_for_new_messages(root):
    """A finished message's mess and intd files wait in spare/; a new message takes
    them (its number is the mess file's inode, as ever) and cuts their old contents
    off. An intd file never serves the number it served before (see check_record)."""
    from smarthost.queue import CHECKED

    q = Queue(root.queue_dir)
    old = b"Subject: old\n\n" + b"x" * 5000
    a, b = (q.inject(old, "a@b.example", ["c@d.example"], received=b"").id for _ in range(2))
    intd_of = {os.stat(q.intd(n)).st_ino: n for n in (a, b)}
    assert _finished(q, [a, b], len(old)) == [None, None]
    assert sorted(os.listdir(q.sub("spare"))) == sorted([f"m{a}", f"m{b}", f"i{a}", f"i{b}"])
    assert q.mess_ids() == [] and q.todo_ids() == [] and os.listdir(q.sub("intd")) == []

    body = b"Subject: new\n\nshort\n"
    done = q.inject(body, "e@f.example", ["g@h.example"], received=b"")
    n = done.id
    assert n in (a, b) and os.stat(q.mess(n)).st_ino == n
    assert open(q.mess(n), "rb").read() == body
    st_env = os.stat(q.todo(n))
    assert intd_of[st_env.st_ino] == ({a, b} - {n}).pop()  # the other message's intd file
    assert st_env.st_mode & 0o7777 == 0o600 | CHECKED
    head = b"u%d\0p%d\0Fe@f.example\0Tg@h.example\0" % (os.getuid(), done.qp)
    assert open(q.todo(n), "rb").read() == head + b"c%d %08x %08x %d\0" % (
        len(body), zlib.crc32(body), zlib.crc32(head), n)
    # The next one gets the other mess file and the intd file message n had.
    m = q.inject(body, "e@f.example", ["g@h.example"], received=b"").id
    assert {m, n} == {a, b} and intd_of[os.stat(q.todo(m)).st_ino] == n
    assert os.listdir(q.sub("spare")) == []
    # with none left, files are made new
    k = q.inject(body, "e@f.example", ["g@h.example"], received=b"").id
    assert k not in (a, b) and os.stat(q.todo(k)).st_ino not in intd_of


@pytest.mark.parametrize("stale", ["envelope", "message"])
def test_a_reused_file_whose_new_contents_a_crash_lost_is_found_by_a_listing(root, stale):
    """A crash after the todo link, before the fsyncs: the disk may still hold what a
    reused file held for the message before. The check record tells it: an envelope
    names its own message, and the message's length and CRC-32 are the new one's."""
    from smarthost.rewrite import Routing
    from smarthost.sendqueue import IncompleteTodo, SendQueue

    q = Queue(root.queue_dir)
    same = b"Subject: the same\n\nevery time\n"  # even the same message is not taken for another
    a, b = (q.inject(same if stale == "envelope" else b"Subject: %d\n\nx\n" % i, "a@b.example",
                     [f"r{i}@d.example"], received=b"").id for i in range(2))
    before = {n: open(q.mess(n), "rb").read() for n in (a, b)}
    envelope_in = {os.stat(q.intd(n)).st_ino: open(q.intd(n), "rb").read() for n in (a, b)}
    _finished(q, [a, b])
    n = q.inject(same if stale == "envelope" else b"Subject: new\n\nx\n", "a@b.example",
                 ["new@d.example"], received=b"").id
    if stale == "envelope":  # what the reused intd file held before
        with open(q.todo(n), "r+b") as f:
            f.write(envelope_in[os.fstat(f.fileno()).st_ino])
            f.truncate()
    else:                    # the mess file is n's own, as message n had it before
        with open(q.mess(n), "r+b") as f:
            f.write(before[n])
            f.truncate()
    sq = SendQueue(q)
    with pytest.raises(IncompleteTodo):
        sq.preprocess(n, Routing.from_control(root.control), listed=True)


def test_a_number_never_gets_back_its_own_intd_file(root):
    """Its stale envelope, after a crash, would name the right message (see check_record)."""
    q = Queue(root.queue_dir)
    a = q.inject(b"Subject: a\n\nx\n", "a@b.example", ["c@d.example"]).id
    _finished(q, [a])
    assert q.inject(b"Subject: b\n\nx\n", "a@b.example", ["c@d.example"]).id == a
    assert os.listdir(q.sub("spare")) == [f"i{a}"]


def test_a_spare_mess_file_still_open_elsewhere_is_not_reused(root):
    """qmail hands a program its message as the queue file itself, on standard input;
    whatever still holds it open must go on reading that message, not a new one."""
    q = Queue(root.queue_dir)
    n = q.inject(b"Subject: old\n\nstill read\n", "a@b.example", ["c@d.example"], received=b"").id
    held = os.open(q.mess(n), os.O_RDONLY)
    try:
        _finished(q, [n])
        assert os.listdir(q.sub("spare")) == [f"i{n}"] and q.mess_ids() == []  # removed, not kept
        m = q.inject(b"Subject: new\n\nx\n", "a@b.example", ["c@d.example"], received=b"").id
        assert m != n
        assert os.pread(held, 100, 0) == b"Subject: old\n\nstill read\n"
    finally:
        os.close(held)


def test_spare_files_are_capped_and_a_big_message_is_not_kept(root, monkeypatch):
    from smarthost import queue as queue_mod

    monkeypatch.setattr(queue_mod, "SPARES", 2)
    q = Queue(root.queue_dir)
    ns = [q.inject(b"Subject: %d\n\nx\n" % i, "a@b.example", ["c@d.example"]).id for i in range(3)]
    big = q.inject(b"x" * (queue_mod.SPARE_SIZE_MAX + 1), "a@b.example", ["c@d.example"]).id
    assert _finished(q, [big], queue_mod.SPARE_SIZE_MAX + 1) == [None]
    assert os.listdir(q.sub("spare")) == [f"i{big}"]  # its envelope is kept, its message is not
    assert _finished(q, ns) == [None, None, None]
    spares = os.listdir(q.sub("spare"))
    assert sorted(x[0] for x in spares) == ["i", "i", "m", "m"]
    assert q.mess_ids() == [] and q.todo_ids() == [] and os.listdir(q.sub("intd")) == []


def test_without_spare_directory_files_are_removed_and_made_new(root):
    """A queue made before spare/ existed: nothing kept, nothing taken."""
    q = Queue(root.queue_dir)
    os.rmdir(q.sub("spare"))
    n = q.inject(b"Subject: a\n\nx\n", "a@b.example", ["c@d.example"]).id
    assert _finished(q, [n]) == [None]
    assert q.mess_ids() == [] and os.listdir(q.sub("intd")) == [] and not os.path.exists(q.sub("spare"))
    m = q.inject(b"Subject: b\n\nx\n", "a@b.example", ["c@d.example"]).id
    assert q.todo_ids() == [m]


def test_a_symlink_in_spare_is_never_written_through(root, tmp_path):
    """Whatever else lies in spare/ is not a queue file: an injector writes into no file
    a symlink there names, and puts it out of the way."""
    q = Queue(root.queue_dir)
    outside = tmp_path / "outside"
    outside.write_bytes(b"not the queue's\n")
    os.symlink(outside, q.spare_path("m", 1))
    os.symlink(outside, q.spare_path("i", 2))
    n = q.inject(b"Subject: a\n\nx\n", "a@b.example", ["c@d.example"], received=b"").id
    assert outside.read_bytes() == b"not the queue's\n"
    assert not os.path.islink(q.mess(n)) and not os.path.islink(q.todo(n))
    assert open(q.mess(n), "rb").read() == b"Subject: a\n\nx\n"
    assert os.listdir(q.sub("spare")) == []


def test_a_spare_another_user_owns_is_put_out_of_the_way():
    """An injector that may not write a spare mess file removes it and makes its own."""
    if os.getuid() != 0:
        pytest.skip("needs root to make a file another user owns")
    import shutil
    import tempfile

    top = tempfile.mkdtemp(prefix="spare-owner-")  # under /tmp, which anyone may enter
    try:
        os.chmod(top, 0o755)
        q = Queue(os.path.join(top, "queue"))
        q.create()
        n = q.inject(b"Subject: a\n\nx\n", "a@b.example", ["c@d.example"]).id
        _finished(q, [n])
        for where, dirs, files in os.walk(q.path):  # the queue is the injector's, the spare is not
            for name in dirs + files:
                os.chown(os.path.join(where, name), 65534, 65534)
        os.chown(q.path, 65534, 65534)
        os.chown(q.spare_path("m", n), 0, 0)
        os.chmod(q.spare_path("m", n), 0o600)
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(65534)
                os.setuid(65534)
                m = q.inject(b"Subject: b\n\nx\n", "a@b.example", ["c@d.example"], uid=65534).id
                made = os.stat(q.mess(m)).st_uid == 65534  # its own file (the number may be the same)
                os._exit(0 if made and not os.path.exists(q.spare_path("m", n)) else 1)
            except BaseException as e:
                os.write(2, repr(e).encode())
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        shutil.rmtree(top)
