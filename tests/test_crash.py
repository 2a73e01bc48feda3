"""kill -9 of `smarthost run` during a stream of injections and deliveries loses nothing."""

import os
import re
import signal
import threading
import time

import pytest

from smarthost.queue import Queue
from tests.conftest import Daemon, queue_with_program
from miniqmail import envelope

pytestmark = pytest.mark.timeout(180)
ME = "mx.test.invalid"


def markers(maildir_new):
    found = []
    for name in os.listdir(maildir_new):
        with open(os.path.join(maildir_new, name), "rb") as f:
            m = re.search(rb"^Subject: marker (\d+)$", f.read(), re.M)
            if m:
                found.append(int(m.group(1)))
    return found


def test_kill_9_during_injections_and_deliveries_loses_nothing(root):
    total = 400
    new = root.sub("home", "example", "Maildir", "new")
    # two recipients per message: one deliverable at once, one mbox, so passes are in flight
    with open(root.sub("home", "example", ".qmail-box"), "w") as f:
        f.write("./Mailbox\n")
    q = Queue(root.queue_dir)
    acked: list[int] = []

    def inject():
        for i in range(total):
            body = b"Subject: marker %d\n\nbody\n" % i
            if i % 10 == 0:  # some through the program, as a client would
                code = queue_with_program(root, body, envelope.encode("s@far.example",
                                          [f"example@{ME}", f"example-box@{ME}"]))
                assert code == 0
            else:
                q.inject(body, "s@far.example", [f"example@{ME}", f"example-box@{ME}"])
            acked.append(i)

    d = Daemon(root)
    d2 = None
    d.wait_log("status: local 0/")
    t = threading.Thread(target=inject)
    t.start()
    try:
        # let deliveries get going, then crash in the middle of the stream
        d.wait_log(lambda s: s.startswith("end msg"), timeout=60)
        while len(acked) < total // 3:
            time.sleep(0.01)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        killed_at = len(acked)
        assert killed_at < total
        time.sleep(0.2)
        d2 = Daemon(root)  # a restart while injections go on
        t.join(120)
        assert not t.is_alive()
        deadline = time.monotonic() + 90
        while True:
            got = set(markers(new))
            if got >= set(acked) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        missing = set(acked) - got
        assert not missing, f"lost {len(missing)} acknowledged messages: {sorted(missing)[:20]}"
        # the mbox got every message too
        mbox = open(root.sub("home", "example", "Mailbox"), "rb").read()
        in_mbox = {int(x) for x in re.findall(rb"^Subject: marker (\d+)$", mbox, re.M)}
        deadline = time.monotonic() + 30
        while not in_mbox >= set(acked) and time.monotonic() < deadline:
            time.sleep(0.2)
            mbox = open(root.sub("home", "example", "Mailbox"), "rb").read()
            in_mbox = {int(x) for x in re.findall(rb"^Subject: marker (\d+)$", mbox, re.M)}
        assert in_mbox >= set(acked)
        # and the queue empties
        deadline = time.monotonic() + 30
        while (q.mess_ids() or q.todo_ids()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert q.todo_ids() == []
        assert q.mess_ids() == []
        assert d2.stop() == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
        if d2 is not None:
            d2.stop()
        t.join(5)
