"""Remote delivery into an independent receiver, Postfix's smtp-sink, and 500 deliveries at once."""

import asyncio
import os
import socket
import subprocess
import time

import pytest

from smarthost import evloop

pytest_plugins = ["tests.remote_site"]  # the `site` fixture
pytestmark = pytest.mark.timeout(120)
SINK = "/usr/sbin/smtp-sink"
CONCURRENT = 500


@pytest.fixture
def sink(site):
    if not os.path.exists(SINK):
        pytest.skip(f"{SINK} not installed (Debian package postfix; .ci/run installs it)")
    user = ["-u", "nobody"] if os.getuid() == 0 else []  # smtp-sink refuses to run as root
    proc = subprocess.Popen([SINK, *user, "-m", str(CONCURRENT + 100), f"127.0.0.3:{site.smtp_port}",
                             str(CONCURRENT + 100)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.3", site.smtp_port), 0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("smtp-sink did not start: " + proc.stderr.read().decode(errors="replace"))
            time.sleep(0.05)
    site.mx("sink.test", (10, "mx.sink.test", "127.0.0.3"))
    yield proc
    proc.terminate()
    proc.wait(10)


async def many(site, domain: str, n: int):
    rd = site.delivery()
    path = site.message()
    return await asyncio.gather(*(rd.deliver("s@here.test", [f"r{i}@{domain}", f"q{i}@{domain}"], path)
                                  for i in range(n)))


def test_smtp_sink_accepts(site, sink):
    res = site.deliver(["a@sink.test", "b@sink.test"])
    assert [r[0] for r in res] == ["K", "K"]
    assert res[0][1].startswith("127.0.0.3 accepted message.\nRemote host said: 250 ")


def test_500_concurrent_deliveries_to_smtp_sink(site, sink):
    results = evloop.run(many(site, "sink.test", CONCURRENT))
    assert all(r == "K" for pair in results for r, _ in pair), [p for p in results if p[0][0] != "K"][:3]


def test_500_concurrent_deliveries_to_an_asyncio_receiver(site):
    site.mx("many.test", (10, "mx.many.test", "127.0.0.4"))
    peer = site.smtp("127.0.0.4")
    results = evloop.run(many(site, "many.test", CONCURRENT))
    assert all(r == "K" for pair in results for r, _ in pair)
    assert len(peer.mails) == CONCURRENT and all(len(m.rcpts) == 2 for m in peer.mails)
    assert peer.peak > 50  # they really ran side by side
