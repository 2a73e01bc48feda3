"""What the relay keeps between deliveries: SMTP connections for the next message to the same
server (smarthost.remote.sessions), and the control files for a second."""

from __future__ import annotations

import asyncio
import time

import pytest

from smarthost import evloop
from smarthost.remote.sessions import SessionCache
from tests.remote_peers import CLOSE

pytest_plugins = ["tests.remote_site"]  # the `site` fixture
pytestmark = pytest.mark.timeout(60)


def letters(results) -> str:
    return "".join(letter for letter, _ in results)


def test_one_connection_carries_messages_in_turn_and_says_quit_at_the_end(site):
    site.mx("a.test", (10, "mx.a.test", "127.0.0.2"))
    peer = site.smtp("127.0.0.2")
    rd = site.delivery()

    async def main():
        out = [letters(await rd.deliver("s@here.test", [f"r{i}@a.test"], site.message())) for i in range(3)]
        kept = len(rd.sessions)
        await rd.close()
        return out, kept

    out, kept = evloop.run(main())
    assert out == ["K", "K", "K"]
    assert kept == 1
    assert peer.connections == 1
    assert [m.rcpts for m in peer.mails] == [["r0@a.test"], ["r1@a.test"], ["r2@a.test"]]
    assert sum(c.startswith(b"EHLO") for c in peer.commands) == 1
    deadline = time.monotonic() + 5  # the peer reads it in a thread of its own
    while peer.commands[-1] != b"QUIT\r\n" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert peer.commands[-1] == b"QUIT\r\n"


@pytest.mark.parametrize("second", [b"421 4.4.2 peer.test closing\r\n", CLOSE], ids=["421", "hang-up"])
def test_a_kept_connection_the_server_gave_up_is_replaced_by_a_fresh_one(site, second):
    site.mx("b.test", (10, "mx.b.test", "127.0.0.2"))
    calls = []

    def mail(arg):
        calls.append(arg)
        return second if len(calls) == 2 else b"250 ok\r\n"

    peer = site.smtp("127.0.0.2", replies={"MAIL": mail})
    rd = site.delivery()

    async def main():
        out = [letters(await rd.deliver("s@here.test", [f"r{i}@b.test"], site.message())) for i in range(2)]
        await rd.close()
        return out

    assert evloop.run(main()) == ["K", "K"]
    assert peer.connections == 2
    assert [m.rcpts for m in peer.mails] == [["r0@b.test"], ["r1@b.test"]]
    assert len(calls) == 3


def test_an_idle_kept_connection_gets_its_quit(site):
    site.mx("c.test", (10, "mx.c.test", "127.0.0.2"))
    peer = site.smtp("127.0.0.2")
    rd = site.delivery()
    rd.sessions = SessionCache(idle=0.2)

    async def main():
        first = letters(await rd.deliver("s@here.test", ["x@c.test"], site.message()))
        for _ in range(100):  # its QUIT comes 0.2 s after it was kept
            await asyncio.sleep(0.05)
            if peer.commands[-1] == b"QUIT\r\n" and peer.active == 0:
                break
        quit_seen = peer.commands[-1] == b"QUIT\r\n" and len(rd.sessions) == 0
        second = letters(await rd.deliver("s@here.test", ["y@c.test"], site.message()))
        await rd.close()
        return first, quit_seen, second

    assert evloop.run(main()) == ("K", True, "K")
    assert peer.connections == 2


def test_a_connection_is_kept_only_for_the_same_server_and_terms(site):
    site.mx("d.test", (10, "mx.d.test", "127.0.0.2"))
    site.mx("e.test", (10, "mx.e.test", "127.0.0.3"))
    one, two = site.smtp("127.0.0.2"), site.smtp("127.0.0.3")
    rd = site.delivery()

    async def main():
        out = ""
        for rcpt in ("a@d.test", "b@e.test", "c@d.test", "d@e.test"):
            out += letters(await rd.deliver("s@here.test", [rcpt], site.message()))
        await rd.close()
        return out

    assert evloop.run(main()) == "KKKK"
    assert (one.connections, two.connections) == (1, 1)
    assert [m.rcpts for m in one.mails] == [["a@d.test"], ["c@d.test"]]


def test_control_files_are_read_again_after_a_second_or_at_once_on_sighup(site):
    from smarthost.remote.deliver import CONTROL_TTL

    one, two = site.smtp("127.0.0.2"), site.smtp("127.0.0.3")
    site.control("smtproutes", "f.test:127.0.0.2\n")
    rd = site.delivery()

    async def main():
        out = letters(await rd.deliver("s@here.test", ["a@f.test"], site.message()))
        site.control("smtproutes", "f.test:127.0.0.3\n")
        rd.reread()  # what SIGHUP does
        out += letters(await rd.deliver("s@here.test", ["b@f.test"], site.message()))
        site.control("smtproutes", "f.test:127.0.0.2\n")
        await asyncio.sleep(CONTROL_TTL + 0.1)
        out += letters(await rd.deliver("s@here.test", ["c@f.test"], site.message()))
        await rd.close()
        return out

    t = time.monotonic()
    assert evloop.run(main()) == "KKK"
    assert time.monotonic() - t < 10
    assert [m.rcpts for m in one.mails] == [["a@f.test"], ["c@f.test"]]
    assert [m.rcpts for m in two.mails] == [["b@f.test"]]


def test_a_connection_with_words_nobody_asked_for_is_not_kept(site):
    """A second reply to the final dot would be read as the answer to the next MAIL FROM."""
    site.mx("g.test", (10, "mx.g.test", "127.0.0.2"))
    peer = site.smtp("127.0.0.2", replies={"DOT": b"250 ok\r\n250 and a surprise\r\n"})
    rd = site.delivery()

    async def main():
        out = ""
        for rcpt in ("a@g.test", "b@g.test"):
            out += letters(await rd.deliver("s@here.test", [rcpt], site.message()))
            await asyncio.sleep(0.2)  # the surprise arrives
        await rd.close()
        return out

    assert evloop.run(main()) == "KK"
    assert peer.connections == 2
