"""The scheduler run in process: grouping per domain, the queue sweep, the todo backlog, removals."""

import asyncio
import io
import os
import re
import time

import pytest

from smarthost import evloop
from smarthost.logfmt import Log
from smarthost.queue import Queue
from smarthost.send import Scheduler
from smarthost.sendqueue import SendQueue
from tests.conftest import run_scheduler_until

pytestmark = pytest.mark.timeout(60)


async def stop_when_empty(sched, q: Queue, seconds: float) -> None:
    """Let `sched` run until the queue holds no message (or `seconds` pass), then stop it."""
    for _ in range(int(seconds / 0.05)):
        await asyncio.sleep(0.05)
        if not q.mess_ids():
            break
    sched.on_term()


def test_remote_recipients_go_one_transaction_per_domain(root):
    calls = []
    out = io.StringIO()

    async def remote(msg, recipients, messpath):
        calls.append(sorted(recipients))
        # a per-recipient verdict, as a relay gives it
        return [("D", "Remote host said: 550 no such user (#5.1.1)") if r.startswith("c@")
                else ("K", "127.0.0.2 accepted message.") for r in recipients]

    q = Queue(root.queue_dir)
    n = q.inject(b"Subject: grouped\n\nx\n", "", ["a@x.example", "b@X.EXAMPLE", "c@y.example", "d@y.example"]).id

    evloop.run(run_scheduler_until(Scheduler(root, Log(out), remote=remote), out, f"end msg {n}"))
    log = out.getvalue()
    assert sorted(calls) == [["a@x.example", "b@X.EXAMPLE"], ["c@y.example", "d@y.example"]]
    assert log.count(" to remote ") == 4
    assert log.count(": success: 127.0.0.2_accepted_message.") == 3
    assert log.count(": failure: Remote_host_said:_550") == 1
    assert f"end msg {n}" in log


def test_periodic_cleanup_removes_leftovers_of_dead_injections(root):
    out = io.StringIO()
    q = Queue(root.queue_dir)

    async def main():
        sched = Scheduler(root, Log(out))
        sched.cleanup_interval = 0.2
        task = asyncio.create_task(sched.run())
        await asyncio.sleep(0.3)
        d = q.draft()           # an injection that dies: written, never committed, lock gone
        d.write(b"Subject: half\n")
        n = d.id
        d._done = True          # pretend it was committed so close() leaves the files...
        d.close()               # ...and releases its lock, as a dead process would
        assert q.mess_ids() == [n]
        await stop_when_empty(sched, q, 3)
        await task
        return n

    n = evloop.run(main())
    assert q.mess_ids() == []
    assert f"removed mess/{n % 23}/{n}" in out.getvalue()


def _limits(root, local: int, remote: int) -> None:
    for name, value in (("concurrencylocal", local), ("concurrencyremote", remote)):
        with open(os.path.join(root.control_dir, name), "w") as f:
            f.write(f"{value}\n")


def test_a_backlog_is_preprocessed_a_window_at_a_time_and_waiting_costs_a_persist(root):
    """todo/ is durable already: a backlog stays there until delivery slots come near,
    and only what then waits for a slot is persisted (so a restart knows its state)."""
    _limits(root, 1, 1)
    out = io.StringIO()
    q = Queue(root.queue_dir)
    for i in range(30):
        q.inject(b"Subject: backlog\n\nx\n", "a@here.example", [f"r{i}@far.example"])
    gate = asyncio.Event()
    had_info = []  # in the order the deliveries started

    async def remote(msg, recipients, messpath):
        had_info.append(os.path.exists(q.info(msg.id)))
        await gate.wait()
        return [("K", "127.0.0.2 accepted message.")] * len(recipients)

    async def main():
        sched = Scheduler(root, Log(out), remote=remote)
        sched.lookahead_floor = 4
        task = asyncio.create_task(sched.run())
        for _ in range(400):  # until the first delivery has started (start-up can be slow)
            if had_info:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # well within DURABLE_DELAY: nothing persisted yet
        sched.log.flush()
        early = out.getvalue().count("new msg ")
        todo_early = len(q.todo_ids())
        await asyncio.sleep(0.9)  # past DURABLE_DELAY: those waiting are persisted
        gate.set()
        await stop_when_empty(sched, q, 20)
        await task
        return early, todo_early

    early, todo_early = evloop.run(main())
    assert 4 <= early <= 5  # the lookahead of 4, one of them perhaps running already
    assert todo_early == 30
    assert q.mess_ids() == [] and q.todo_ids() == [] and q.info_ids() == []
    assert out.getvalue().count("new msg ") == 30 and out.getvalue().count("end msg ") == 30
    assert had_info[0] is False        # the first started at once
    assert any(had_info)               # those that waited past the delay were persisted


def test_mail_delivered_at_once_is_never_persisted(root):
    _limits(root, 1, 5)
    out = io.StringIO()
    q = Queue(root.queue_dir)
    for i in range(400):
        q.inject(b"Subject: quick\n\nx\n", "a@here.example", [f"r{i}@far.example"])
    had_info = []

    async def remote(msg, recipients, messpath):
        had_info.append(os.path.exists(q.info(msg.id)))
        await asyncio.sleep(0.01)  # 400 of them at 5 at a time: 0.8 s in all
        return [("K", "127.0.0.2 accepted message.")] * len(recipients)

    async def main():
        sched = Scheduler(root, Log(out), remote=remote)
        sched.lookahead_floor = 10
        task = asyncio.create_task(sched.run())
        await stop_when_empty(sched, q, 30)
        await task

    evloop.run(main())
    assert len(had_info) == 400 and not any(had_info)
    assert q.mess_ids() == [] and q.todo_ids() == []


def test_removing_a_finished_message_never_holds_up_the_loop(root):
    """An unlink can wait a long time for the journal behind other fsyncs: the
    scheduler removes finished messages in a worker thread, not in its loop."""
    out = io.StringIO()
    q = Queue(root.queue_dir)
    slow = q.inject(b"Subject: slow to remove\n\nx\n", "a@here.example", ["r@one.example"]).id
    quick = q.inject(b"Subject: quick\n\nx\n", "a@here.example", ["r@two.example"]).id

    async def remote(msg, recipients, messpath):
        if msg.id == quick:
            await asyncio.sleep(0.2)  # it ends while the other one is being removed
        return [("K", "127.0.0.2 accepted message.")] * len(recipients)

    async def main():
        sched = Scheduler(root, Log(out), remote=remote)
        real = sched.sq.finish

        def finish(msg, room=None):
            if msg.id == slow:
                time.sleep(1.5)  # a slow unlink, as the journal can make it
            real(msg, room)

        sched.sq.finish = finish
        task = asyncio.create_task(sched.run())
        await stop_when_empty(sched, q, 10)
        await task

    evloop.run(main())
    log = out.getvalue()
    d = re.search(rf"starting delivery (\d+): msg {quick} to remote", log).group(1)
    assert log.index(f"delivery {d}: success") < log.index(f"end msg {slow}")
    assert q.mess_ids() == []


def test_messages_finished_close_together_are_removed_in_one_thread_turn(root, monkeypatch):
    """Removals wait REMOVAL_GATHER for company: ten messages finishing a few milliseconds
    apart cost a turn or two of a worker thread, not one each, and all are removed."""
    out = io.StringIO()
    q = Queue(root.queue_dir)
    ids = [q.inject(b"Subject: gathered\n\nx\n", "a@here.example", [f"r@d{i}.example"]).id
           for i in range(10)]
    turns: list[list[int]] = []
    real_finish_all = SendQueue.finish_all

    def finish_all(self, msgs):
        turns.append([m.id for m in msgs])
        return real_finish_all(self, msgs)
    monkeypatch.setattr(SendQueue, "finish_all", finish_all)
    started = asyncio.Event()

    async def remote(msg, recipients, messpath):
        await started.wait()
        await asyncio.sleep(0.002 * ids.index(msg.id))  # one after another, 2 ms apart
        return [("K", "127.0.0.2 accepted message.")] * len(recipients)

    async def main():
        sched = Scheduler(root, Log(out), remote=remote)
        task = asyncio.create_task(sched.run())
        await until(lambda: sched.in_flight == 10)
        started.set()
        await stop_when_empty(sched, q, 10)
        await task

    evloop.run(main())
    assert sorted(n for turn in turns for n in turn) == sorted(ids)
    assert 1 <= len(turns) <= 4, turns  # one each would be ten
    assert q.mess_ids() == [] and out.getvalue().count("end msg") == 10


def recording_remote(sent: list[int]):
    """A relay that accepts everything and notes which messages it was given."""
    async def remote(msg, recipients, messpath):
        sent.append(msg.id)
        return [("K", "127.0.0.2 accepted message.")] * len(recipients)
    return remote


async def until(cond, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


def with_scheduler(root, scenario):
    """Run `scenario(queue, sent)` beside a running scheduler whose relay accepts all
    and notes the ids it is given; return what the scenario returns, and those ids."""
    q = Queue(root.queue_dir)
    sent: list[int] = []

    async def main():
        sched = Scheduler(root, Log(io.StringIO()), remote=recording_remote(sent))
        task = asyncio.create_task(sched.run())
        await asyncio.sleep(0.3)  # past the listing at start
        try:
            return await scenario(q, sent)
        finally:
            sched.on_term()
            await task

    return evloop.run(main()), sent


def test_a_poke_that_names_its_messages_spares_listing_todo(root):
    """Our injectors write the ids they queued into lock/trigger; the scheduler takes
    those without listing todo/. qmail's bare byte still makes it list todo/."""

    async def scenario(q, sent):
        quiet = q.inject(b"Subject: unannounced\n\nx\n", "", ["a@far.example"], trigger=False).id
        named = q.inject(b"Subject: named\n\nx\n", "", ["b@far.example"]).id
        await until(lambda: named in sent)
        await asyncio.sleep(0.3)
        assert quiet not in sent and q.todo_ids() == [quiet]  # todo/ was not listed
        q.poke()
        await until(lambda: quiet in sent)
        return quiet, named

    (quiet, named), sent = with_scheduler(root, scenario)
    assert sent == [named, quiet]
    assert Queue(root.queue_dir).mess_ids() == []


def test_a_message_whose_poke_never_came_is_found_by_a_later_poke(root, monkeypatch):
    """As in qmail, any poke finds what an injector that died before its own poke
    left in todo/: named pokes still have todo/ listed every NAMED_SCAN_INTERVAL."""
    from smarthost import send

    monkeypatch.setattr(send, "NAMED_SCAN_INTERVAL", 0.5)

    async def scenario(q, sent):
        orphan = q.inject(b"Subject: orphan\n\nx\n", "", ["a@far.example"], trigger=False).id
        await asyncio.sleep(0.5)
        named = q.inject(b"Subject: named\n\nx\n", "", ["b@far.example"]).id
        await until(lambda: orphan in sent and named in sent)
        return orphan, named

    (orphan, named), sent = with_scheduler(root, scenario)
    assert sorted(sent) == sorted([orphan, named])


def test_a_local_delivery_waiting_for_new_to_be_synced_holds_no_slot_and_stop_waits_for_it(root,
                                                                                           new_dir_fsync):
    """With concurrencylocal 1, a second delivery starts while the first one's new/ is
    still being synced (its child is free); neither counts before the sync, and a stop
    asked meanwhile waits for both to be recorded."""
    with open(os.path.join(root.control_dir, "concurrencylocal"), "w") as f:
        f.write("1\n")
    fsync = new_dir_fsync
    out = io.StringIO()
    q = Queue(root.queue_dir)
    new = root.sub("home", "example", "Maildir", "new")
    ids = [q.inject(b"Subject: slot\n\nx\n", "a@b.example", ["example@mx.test.invalid"]).id for _ in range(2)]

    async def main():
        sched = Scheduler(root, Log(out))
        task = asyncio.create_task(sched.run())
        deadline = time.monotonic() + 20
        while len(os.listdir(new)) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        sched.log.flush()
        log = out.getvalue()
        assert len(os.listdir(new)) == 2, log
        assert "starting delivery 2" in log and "success" not in log
        sched.on_term()
        await asyncio.sleep(0.3)
        assert not task.done()
        fsync.gate.set()
        await asyncio.wait_for(task, 20)

    evloop.run(main())
    log = out.getvalue()
    assert log.count(": success: did_1+0+0/") == 2, log
    assert log.index("delivery 2: success") < log.index("status: exiting")
    assert q.todo_ids() == [] and all(not os.path.exists(q.todo(n)) for n in ids)
    assert 1 <= len(fsync.calls) <= 2


def test_a_number_poked_while_its_old_message_is_removed_is_taken_without_a_listing(root, monkeypatch):
    """A finished message's mess file goes to spare/, and a new message may take it,
    so its number, and poke it before the scheduler has forgotten the old message:
    the poke is kept until it has, and the new message needs no listing of todo/."""
    real_finish_all = SendQueue.finish_all
    again: list[int] = []

    def finish_all(self, msgs):
        errors = real_finish_all(self, msgs)
        if not again:  # still in the removal's turn: the old message is known yet
            again.append(Queue(root.queue_dir).inject(b"Subject: again\n\nx\n", "", ["b@far.example"]).id)
        return errors
    monkeypatch.setattr(SendQueue, "finish_all", finish_all)

    async def scenario(q, sent):
        listings = []
        real_todo_ids = q.todo_ids
        monkeypatch.setattr(Queue, "todo_ids", lambda self: listings.append(1) or real_todo_ids())
        first = q.inject(b"Subject: first\n\nx\n", "", ["a@far.example"]).id
        await until(lambda: len(sent) == 2, 5)
        return first, listings

    (first, listings), sent = with_scheduler(root, scenario)
    assert again == [first] and sent == [first, first]  # the same number, twice
    assert listings == []
    assert Queue(root.queue_dir).mess_ids() == []


def test_the_scheduler_gives_a_queue_made_before_spare_files_its_spare_directory(root):
    q = Queue(root.queue_dir)
    os.rmdir(q.sub("spare"))
    n = q.inject(b"Subject: old queue\n\nx\n", "", ["a@far.example"], trigger=False).id
    _, sent = with_scheduler(root, lambda q, sent: until(lambda: sent, 5))
    assert sent == [n] and os.path.isdir(q.sub("spare"))
