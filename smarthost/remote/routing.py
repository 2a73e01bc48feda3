"""Where a domain's mail goes: smtproutes, qmtproutes, MXPS and the loop check of qmail-remote(8).

Pure policy over values. `DomainMap` is qmail's constmap with qmail-remote's
lookup order: the domain itself, then each `.suffix` from the longest, then
the empty key; keys are case-insensitive and the last line for a key wins.

    smtproutes   domain:relay[:port]   relay = name, IP, [IP] or [IPv6]; empty relay = use MX
    qmtproutes   domain:relay[:port]   the same, but QMTP first (port 209), SMTP if that
                                       connection fails; an empty relay means "not here"

MXPS (cr.yp.to/proto/mxps.txt): an MX preference 12800..13055 with pref % 16 == 1
means the exchanger speaks QMTP; try port 209 first, SMTP if that connection fails.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

SMTP_PORT = 25
QMTP_PORT = 209
#: the preference qmail-remote gives a relay, a literal, or a domain without MX records
RELAY_PREF = 0


class DomainMap:
    """`key:value` lines looked up the way qmail-remote looks up smtproutes."""

    def __init__(self, lines: list[str] | None):
        self.table: dict[str, str] = {}
        for line in lines or []:
            key, sep, value = line.partition(":")
            if sep:  # lines without a colon are ignored, as constmap does
                self.table[key.lower()] = value

    def lookup(self, domain: str) -> str | None:
        d = domain.lower()
        if d in self.table:
            return self.table[d]
        for i, ch in enumerate(d):
            if ch == "." and d[i:] in self.table:
                return self.table[d[i:]]
        return self.table.get("")


def parse_ip(text: str) -> IP | None:
    """A literal address: 1.2.3.4, [1.2.3.4], [IPv6:…], or a bare or bracketed IPv6 one."""
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
        if t[:5].lower() == "ipv6:":
            t = t[5:]
    try:
        return ipaddress.ip_address(t)
    except ValueError:
        return None


@dataclass(frozen=True)
class Relay:
    host: str              # a name or an address literal
    port: int | None       # None: the protocol's default


def parse_relay(value: str) -> Relay | None:
    """`relay[:port]` from a routes line; None for an empty relay."""
    v = value.strip()
    if not v:
        return None
    port_text = ""
    if v.startswith("["):
        end = v.find("]")
        host, rest = (v[:end + 1], v[end + 1:]) if end > 0 else (v, "")
        if rest.startswith(":"):
            port_text = rest[1:]
    else:
        host, _, port_text = v.partition(":")
    digits = ""
    for ch in port_text.strip():  # qmail's scan_ulong: the leading digits
        if not ch.isdigit():
            break
        digits += ch
    port = int(digits) if digits and 0 < int(digits) < 65536 else None
    return Relay(host, port)


@dataclass(frozen=True)
class Route:
    """How to reach one domain: through a relay, or by its MX records."""

    relay: Relay | None
    qmtp: bool


def route(domain: str, smtproutes: DomainMap, qmtproutes: DomainMap) -> Route:
    q = qmtproutes.lookup(domain)
    if q is not None:
        relay = parse_relay(q)
        if relay is not None:
            return Route(relay, True)
    s = smtproutes.lookup(domain)
    return Route(parse_relay(s) if s is not None else None, False)


def mxps_qmtp(pref: int) -> bool:
    """MXPS slice 1: 12801, 12817, … 13041."""
    return 12800 <= pref <= 13055 and pref % 16 == 1


@dataclass(frozen=True)
class Target:
    """One address to try, in order."""

    ip: IP
    pref: int
    name: str              # the exchanger's name (for TLS checks and logs)
    qmtp: bool             # try QMTP before SMTP
    smtp_port: int
    qmtp_port: int


def order(mxs: list[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """Lowest preference first; equal preferences in random order (qmail's dns_mxip)."""
    shuffled = list(mxs)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda m: m[0])  # sorted() is stable: the shuffle stays within a preference


def usable(targets: list[Target], ipme: frozenset[IP], loopcheck: bool) -> list[Target]:
    """Only exchangers preferred over this host (qmail's prefme); [] means we are the best MX."""
    if not loopcheck:
        return targets
    prefme = min((t.pref for t in targets if t.ip in ipme), default=None)
    if prefme is None:
        return targets
    return [t for t in targets if t.pref < prefme]
