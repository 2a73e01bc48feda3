"""The addresses to try for a domain: routes, MX, A and AAAA (qmail-remote(8), qmail's dns.c).

`plan()` holds qmail-remote's rules and asks a `Lookup` for DNS data;
`DnsLookup` answers with dnspython's asyncio resolver, tests may use anything
with the same two methods. The rules:

* a relay from smtproutes/qmtproutes: its addresses (A and AAAA), no loop check;
* an address literal (`1.2.3.4`, `[1.2.3.4]`, `[IPv6:…]`): that address;
* else the MX records, lowest preference first, equal ones in random order,
  each exchanger's IPv4 then IPv6 addresses; a domain without MX records is
  its own exchanger (preference 0); a null MX (RFC 7505) refuses mail;
* a temporary DNS failure defers unless other exchangers resolved; a domain
  that does not exist fails; nothing to connect to fails;
* loop check: only exchangers preferred over this host are used, and if this
  host is the best, delivery fails (#5.4.6) rather than loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from typing import TYPE_CHECKING, Callable, Protocol

from smarthost.remote import report
from smarthost.remote.report import D, Z, Outcome
from smarthost.remote.routing import IP, RELAY_PREF, Route, Target, mxps_qmtp, order, parse_ip, usable

if TYPE_CHECKING:
    import dns.rrset


class DnsTemporary(Exception):
    """Ask again later."""


class DnsNonexistent(Exception):
    """The name does not exist (NXDOMAIN), or cannot be a domain name at all."""


class Lookup(Protocol):
    async def mx(self, name: str) -> list[tuple[int, str]] | None:
        """MX records as (preference, exchanger); [] if none; None for a null MX."""

    async def addresses(self, name: str) -> list[IP]:
        """A records, then AAAA records; [] if none."""


class DnsLookup:
    """dnspython's asyncio resolver: /etc/resolv.conf's servers, or the given ones."""

    def __init__(self, nameservers: tuple[tuple[str, int], ...] | None, lifetime: float):
        import dns.asyncresolver
        import dns.nameserver
        import dns.resolver

        self.broken = ""
        self.resolver = dns.asyncresolver.Resolver(configure=False)
        if nameservers is None:
            try:
                self.resolver.read_resolv_conf("/etc/resolv.conf")
            except (dns.resolver.NoResolverConfiguration, OSError) as e:
                self.broken = str(e) or "no resolver configuration"
        else:
            self.resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in nameservers]
        if not self.resolver.nameservers:
            self.broken = "no DNS servers configured"
        self.resolver.lifetime = float(lifetime)
        self.resolver.timeout = min(self.resolver.timeout, float(lifetime))
        self.resolver.cache = dns.resolver.LRUCache(10000)  # answers are cached for their TTL

    async def _query(self, name: str, rdtype: str) -> "dns.rrset.RRset | None":
        import dns.exception
        import dns.name
        import dns.resolver

        if self.broken:
            raise DnsTemporary(self.broken)
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError, ValueError) as e:
            raise DnsNonexistent(name) from e
        try:
            answer = await self.resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.YXDOMAIN) as e:
            raise DnsNonexistent(name) from e
        except dns.exception.DNSException as e:
            raise DnsTemporary(str(e)) from e
        return answer.rrset

    async def mx(self, name: str) -> list[tuple[int, str]] | None:
        import dns.name

        rrset = await self._query(name, "MX")
        if rrset is None:
            return []
        if any(rr.exchange == dns.name.root for rr in rrset):
            return None
        return [(rr.preference, rr.exchange.to_text(omit_final_dot=True)) for rr in rrset]

    async def addresses(self, name: str) -> list[IP]:
        results = await asyncio.gather(self._query(name, "A"), self._query(name, "AAAA"),
                                       return_exceptions=True)
        found: list[IP] = []
        failures: list[BaseException] = []
        for res in results:
            if isinstance(res, BaseException):
                if not isinstance(res, (DnsTemporary, DnsNonexistent)):
                    raise res
                failures.append(res)
            elif res is not None:
                found += [ipaddress.ip_address(rr.address) for rr in res]
        if found:
            return found  # one family answering is enough
        if any(isinstance(f, DnsTemporary) for f in failures):
            raise DnsTemporary(name)
        if len(failures) == 2:
            raise DnsNonexistent(name)
        return []


async def _addresses(lookup: Lookup, name: str) -> list[IP] | Outcome:
    try:
        return await lookup.addresses(name)
    except DnsTemporary:
        return report.message(Z, report.TEMP_DNS)
    except DnsNonexistent:
        return report.message(D, report.perm_dns(name))


async def plan(lookup: Lookup, domain: str, rt: Route, smtpport: int, qmtpport: int,
               ipme: Callable[[], frozenset[IP]], rng: random.Random) -> list[Target] | Outcome:
    """The addresses to try, in order, or the report that ends the delivery now."""
    if rt.relay is not None:
        host, port = rt.relay.host, rt.relay.port
        literal = parse_ip(host)
        found = [literal] if literal is not None else await _addresses(lookup, host)
        if isinstance(found, Outcome):
            return found
        if not found:
            return report.message(D, report.NOMX)
        sport = smtpport if rt.qmtp or port is None else port
        qport = port if rt.qmtp and port is not None else qmtpport
        return _unique([Target(ip, RELAY_PREF, host, rt.qmtp, sport, qport) for ip in found])

    literal = parse_ip(domain)
    if literal is not None:
        targets = [Target(literal, RELAY_PREF, domain, False, smtpport, qmtpport)]
    else:
        try:
            mxs = await lookup.mx(domain)
        except DnsTemporary:
            return report.message(Z, report.TEMP_DNS)
        except DnsNonexistent:
            return report.message(D, report.perm_dns(domain))
        if mxs is None:
            return report.message(D, report.NULLMX)
        if not mxs:
            mxs = [(RELAY_PREF, domain)]
        ordered = order(mxs, rng)
        names = list(dict.fromkeys(name for _, name in ordered))
        answers = await asyncio.gather(*(lookup.addresses(n) for n in names), return_exceptions=True)
        by_name = dict(zip(names, answers))
        targets = []
        soft = False
        for pref, name in ordered:
            res = by_name[name]
            if isinstance(res, DnsTemporary):
                soft = True
            elif isinstance(res, BaseException):
                if not isinstance(res, DnsNonexistent):
                    raise res
            else:
                targets += [Target(ip, pref, name, mxps_qmtp(pref), smtpport, qmtpport) for ip in res]
        if not targets:
            if mxs == [(RELAY_PREF, domain)] and isinstance(by_name[domain], DnsNonexistent):
                return report.message(D, report.perm_dns(domain))
            return report.message(Z, report.TEMP_DNS) if soft else report.message(D, report.NOMX)
    good = usable(targets, ipme(), loopcheck=True)
    if not good:
        return report.message(D, report.AMBIGMX)
    return _unique(good)


def _unique(targets: list[Target]) -> list[Target]:
    """Each address once, where it first comes."""
    seen: set[IP] = set()
    out = []
    for t in targets:
        if t.ip not in seen:
            seen.add(t.ip)
            out.append(t)
    return out
