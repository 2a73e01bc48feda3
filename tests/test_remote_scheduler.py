"""RemoteDelivery as the scheduler's remote channel: queue → SMTP peer, and a bounce for the refused."""

import io
import os

import pytest

from smarthost import evloop
from smarthost.logfmt import Log
from smarthost.queue import Queue
from smarthost.remote import RemoteDelivery
from smarthost.send import Scheduler
from tests.conftest import run_scheduler_until, wait_files

pytest_plugins = ["tests.remote_site"]  # the `site` fixture
pytestmark = pytest.mark.timeout(60)


def test_queued_message_goes_out_and_the_refused_recipient_bounces(site):
    site.mx("far.test", (10, "mx.far.test", "127.0.0.2"))
    peer = site.smtp("127.0.0.2", replies={"RCPT": lambda a: b"550 5.1.1 who?\r\n" if a.startswith("bad")
                                           else b"250 ok\r\n"})
    root = site.root
    me = root.control.line("me")
    n = Queue(root.queue_dir).inject(b"Subject: out\n\nhello\n", f"example@{me}",
                                     ["a@far.test", "bad@far.test", "b@FAR.test"]).id
    out = io.StringIO()

    async def main():
        log = Log(out)
        rd = RemoteDelivery(root, log)

        async def remote(msg, recipients, messpath):
            return await rd.deliver(msg.sender, recipients, messpath)

        await run_scheduler_until(Scheduler(root, log, remote=remote), out, f"end msg {n}")

    evloop.run(main())
    log = out.getvalue()
    assert f"end msg {n}" in log, log
    [mail] = peer.mails
    assert mail.rcpts == ["a@far.test", "b@FAR.test"] and mail.data.endswith(b"Subject: out\r\n\r\nhello\r\n")
    assert log.count("success: 127.0.0.2_accepted_message./Remote_host_said:_250_ok_1234_qp_5678/") == 2
    assert "failure: 127.0.0.2_does_not_like_recipient./Remote_host_said:_550_5.1.1_who?/" in log
    [bounce] = wait_files(os.path.join(root.sub("home", "example", "Maildir", "new")))
    text = open(bounce, "rb").read()
    assert b"<bad@far.test>:\n127.0.0.2 does not like recipient.\nRemote host said: 550 5.1.1 who?\n" in text
