"""The control files remote delivery reads (qmail-control(5), qmail-remote(8)), in one snapshot.

qmail's files and defaults: helohost (else me, else a temporary failure),
timeoutconnect 60, timeoutremote 1200, smtproutes. Beyond qmail:

    qmtproutes   like smtproutes, for QMTP (see smarthost.remote.routing)
    smtpport     the SMTP port of exchangers and relays without a port (25),
    qmtpport     and the QMTP port (209): for networks, or tests, where mail
                 servers listen elsewhere
    tlspolicy    per-domain TLS demands; tlsca.pem extra CA certificates
                 (see smarthost.remote.tlspolicy)
    resolvers    `IP`, `IP:port` or `[IPv6]:port` lines: ask these DNS servers
                 instead of /etc/resolv.conf's
    timeoutdns   seconds a DNS question may take, retries included (30)
    moreipme, notipme   corrections to the addresses that count as this host
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from miniqmail.control import Control, ControlError
from smarthost.remote.routing import QMTP_PORT, SMTP_PORT, DomainMap, parse_ip
from smarthost.remote.tlspolicy import TlsPolicy

TIMEOUT_CONNECT = 60
TIMEOUT_REMOTE = 1200
TIMEOUT_DNS = 30


def _port(ctl: Control, name: str, default: int) -> int:
    n = ctl.number(name, default)
    return n if 0 < n < 65536 else default


def parse_resolver(line: str) -> tuple[str, int] | None:
    """`IP`, `IP:port`, `[IPv6]:port` or a bare IPv6 address; None if it is none of them."""
    text = line.strip()
    port = 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            if not rest[1:].isdigit():
                return None
            port = int(rest[1:])
        text = host
    elif text.count(":") == 1:
        text, _, p = text.partition(":")
        if not p.isdigit():
            return None
        port = int(p)
    ip = parse_ip(text)
    if ip is None or not 0 < port < 65536:
        return None
    return str(ip), port


@dataclass(frozen=True)
class RemoteConfig:
    helohost: str
    timeoutconnect: int
    timeoutremote: int
    timeoutdns: int
    smtproutes: DomainMap
    qmtproutes: DomainMap
    smtpport: int
    qmtpport: int
    tlspolicy: TlsPolicy
    tlsca: str | None
    resolvers: tuple[tuple[str, int], ...] | None
    moreipme: tuple[str, ...]
    notipme: tuple[str, ...]

    @classmethod
    def from_control(cls, ctl: Control) -> "RemoteConfig":
        """Read them all; ControlError if one is unreadable or helohost has no value."""
        helohost = ctl.line("helohost")
        if helohost is None:
            helohost = ctl.line("me")
        if not helohost:
            raise ControlError(ctl.path("helohost"), "no helohost and no me")
        resolvers = None
        lines = ctl.lines("resolvers")
        if lines is not None:
            resolvers = tuple(r for r in map(parse_resolver, lines) if r is not None)
        tlsca = ctl.path("tlsca.pem")
        return cls(
            helohost=helohost,
            # a zero would fail every attempt at once: take it as "not set"
            timeoutconnect=ctl.number("timeoutconnect", TIMEOUT_CONNECT) or TIMEOUT_CONNECT,
            timeoutremote=ctl.number("timeoutremote", TIMEOUT_REMOTE) or TIMEOUT_REMOTE,
            timeoutdns=ctl.number("timeoutdns", TIMEOUT_DNS) or TIMEOUT_DNS,
            smtproutes=DomainMap(ctl.lines("smtproutes")),
            qmtproutes=DomainMap(ctl.lines("qmtproutes")),
            smtpport=_port(ctl, "smtpport", SMTP_PORT),
            qmtpport=_port(ctl, "qmtpport", QMTP_PORT),
            tlspolicy=TlsPolicy(ctl.lines("tlspolicy")),
            tlsca=tlsca if os.path.exists(tlsca) else None,
            resolvers=resolvers,
            moreipme=tuple(ctl.lines("moreipme") or ()),
            notipme=tuple(ctl.lines("notipme") or ()),
        )
