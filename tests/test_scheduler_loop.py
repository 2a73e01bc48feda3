"""The scheduler run in process: remote recipients grouped per domain, the periodic queue sweep."""

import asyncio
import io
import os

import pytest

from smarthost.logfmt import Log
from smarthost.queue import Queue
from smarthost.send import Scheduler
from tests.conftest import run_scheduler_until

pytestmark = pytest.mark.timeout(60)


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

    asyncio.run(run_scheduler_until(Scheduler(root, Log(out), remote=remote), out, f"end msg {n}"))
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
        for _ in range(60):
            await asyncio.sleep(0.05)
            if not q.mess_ids():
                break
        sched.on_term()
        await task
        return n

    n = asyncio.run(main())
    assert q.mess_ids() == []
    assert f"removed mess/{n % 23}/{n}" in out.getvalue()
