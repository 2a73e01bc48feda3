"""A test bed for remote delivery: a smart-host root whose DNS is a test server on 127.0.0.1
and whose exchangers are peers on 127.0.0.2 … 127.0.0.9 and ::1, sharing one SMTP and one
QMTP port (control/smtpport, control/qmtpport). Import `site` into a test module to use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from smarthost import evloop
from smarthost.remote import RemoteDelivery
from smarthost.root import Root
from tests.dnsserver import DnsServer
from tests.remote_peers import MESSAGE, LoopThread, QmtpPeer, SmtpPeer, common_port

HOSTS = [f"127.0.0.{i}" for i in range(2, 10)]


@dataclass
class Site:
    root: Root
    dns: DnsServer
    loop: LoopThread
    smtp_port: int
    qmtp_port: int
    log: list[str] = field(default_factory=list)
    peers: list = field(default_factory=list)
    count: int = 0

    def control(self, name: str, text: str) -> None:
        with open(os.path.join(self.root.control_dir, name), "w") as f:
            f.write(text)

    def smtp(self, host: str, **kw) -> SmtpPeer:
        kw.setdefault("port", self.smtp_port)
        peer = self.loop.call(SmtpPeer(host, **kw).start())
        self.peers.append(peer)
        return peer

    def qmtp(self, host: str, **kw) -> QmtpPeer:
        kw.setdefault("port", self.qmtp_port)
        peer = self.loop.call(QmtpPeer(host, **kw).start())
        self.peers.append(peer)
        return peer

    def close(self, peer) -> None:
        self.loop.call(peer.close())

    def mx(self, domain: str, *exchangers: tuple[int, str, str]) -> None:
        """MX records for `domain`: (preference, exchanger name, its address)."""
        for pref, name, ip in exchangers:
            self.dns.add(domain, "MX", f"{pref} {name}.")
            self.dns.add(name, "AAAA" if ":" in ip else "A", ip)

    def message(self, data: bytes = MESSAGE) -> str:
        self.count += 1
        path = os.path.join(self.root.path, f"message{self.count}")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def delivery(self) -> RemoteDelivery:
        return RemoteDelivery(self.root, self.log.append, clean_tcpto=False)

    def deliver(self, rcpts: list[str], sender: str = "sender@here.test", data: bytes = MESSAGE,
                rd: RemoteDelivery | None = None) -> list[tuple[str, str]]:
        rd = rd or self.delivery()
        return evloop.run(rd.deliver(sender, rcpts, self.message(data)))


@pytest.fixture
def site(root):
    dns = DnsServer().start()
    loop = LoopThread()
    smtp_port = common_port(HOSTS)
    qmtp_port = common_port(HOSTS)
    s = Site(root, dns, loop, smtp_port, qmtp_port)
    # the `root` fixture routes all remote mail to a closed local port; here DNS decides
    os.unlink(os.path.join(root.control_dir, "smtproutes"))
    s.control("resolvers", f"# the test zone\n127.0.0.1:{dns.port}\n")
    s.control("smtpport", f"{smtp_port}\n")
    s.control("qmtpport", f"{qmtp_port}\n")
    s.control("helohost", "relay.test\n")
    s.control("timeoutconnect", "2\n")
    s.control("timeoutremote", "5\n")
    s.control("timeoutdns", "5\n")
    yield s
    for peer in s.peers:
        try:
            loop.call(peer.close(), timeout=5)
        except Exception:
            pass
    loop.stop()
    dns.stop()
