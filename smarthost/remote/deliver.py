"""Remote delivery of one message to the recipients of one domain: qmail-remote(8)'s main().

Routing and DNS give the addresses in order; addresses tcpto remembers as
dead are skipped; the first address that accepts a connection carries the
whole transaction (a 4xx there does not move on to the next MX, as in qmail),
except that a TLS policy failure moves on, and a failed opportunistic TLS
handshake is retried once in cleartext on the same address. An exchanger in
the MXPS QMTP slice (or a qmtproutes relay) gets QMTP first, and SMTP on the
same address only if the QMTP connection cannot be made.

`RemoteDelivery` is the scheduler's remote channel: it reads the control
files again for a delivery at most CONTROL_TTL seconds after it last read
them (qmail-remote reads them at every run; reading them for each of a
thousand deliveries a second would cost more than the SMTP dialogue), keeps
what is costly to build (the resolver and its cache, TLS contexts, kept
connections), and clears tcpto when it is made, as qmail-rspawn does when
it starts.
"""

from __future__ import annotations

import os
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from miniqmail.control import ControlError
from smarthost.remote import report
from smarthost.remote.config import RemoteConfig
from smarthost.remote.ipme import ipme
from smarthost.remote.mx import DnsLookup, Lookup, plan
from smarthost.remote.qmtp_client import exchange
from smarthost.remote.report import Z, Outcome
from smarthost.remote.routing import IP, Target, route
from smarthost.remote.sessions import SessionCache
from smarthost.remote.smtp_session import Resume, SmtpSession, Transaction
from smarthost.remote.tcpto import TcptoFiles
from smarthost.remote.tlspolicy import TlsMode, opportunistic_context, verifying_context
from smarthost.remote.transport import Channel, ConnectFailed, connect, drive
from smarthost.root import Root

Log = Callable[[str], None]
#: seconds the control files read for one delivery serve the next ones
CONTROL_TTL = 1.0


class MessageSource:
    """The message, opened afresh for each attempt: a path, or a seekable descriptor (fd 0)."""

    def __init__(self, path: str | None = None, fd: int | None = None):
        self.path = path
        self.fd = fd

    def open(self) -> BinaryIO:
        if self.path is not None:
            return open(self.path, "rb")
        assert self.fd is not None
        os.lseek(self.fd, 0, os.SEEK_SET)
        return os.fdopen(os.dup(self.fd), "rb")

    def facts(self) -> tuple[int, bool]:
        """(size, partial final line?); OSError if it cannot be read."""
        with self.open() as f:
            size = os.fstat(f.fileno()).st_size
            if not size:
                return 0, False
            f.seek(size - 1)
            return size, f.read(1) != b"\n"


@dataclass
class Environment:
    """What one delivery needs besides the message."""

    config: RemoteConfig
    lookup: Lookup
    tcpto: TcptoFiles
    log: Log
    rng: random.Random = field(default_factory=random.Random)
    contexts: dict[bool, ssl.SSLContext] = field(default_factory=dict)
    sessions: SessionCache | None = None   # connections kept for the next message, if any

    def ipme(self) -> frozenset[IP]:
        return ipme(list(self.config.moreipme), list(self.config.notipme))

    def tls_context(self, verify: bool) -> ssl.SSLContext:
        if verify not in self.contexts:
            self.contexts[verify] = verifying_context(self.config.tlsca) if verify else opportunistic_context()
        return self.contexts[verify]


def clean(text: str) -> str:
    """Text for one log line: control characters become '_' (spaces stay, unlike logfmt.safe)."""
    return "".join("_" if ord(c) < 32 or ord(c) == 127 else c for c in text)


def _server_name(t: Target) -> str:
    name = t.name.strip("[]")
    return name[5:] if name[:5].lower() == "ipv6:" else name


async def _qmtp(env: Environment, t: Target, sender: str, recipients: tuple[str, ...], msg: MessageSource,
                size: int, seen: bool) -> Outcome | None:
    """QMTP to `t`; None if no connection could be made (then SMTP gets its turn)."""
    try:
        reader, writer = await connect(t.ip, t.qmtp_port, env.config.timeoutconnect)
    except ConnectFailed as e:
        env.log(f"remote: QMTP to {t.ip} port {t.qmtp_port}: {clean(str(e))}; trying SMTP")
        return None
    env.tcpto.note(t.ip, False, seen)
    try:
        body = msg.open()
    except OSError:
        writer.transport.abort()
        return report.message(Z, report.TEMP_READ)
    with body:
        return await exchange(Channel(reader, writer, env.config.timeoutremote), str(t.ip), sender,
                              recipients, body, size)


async def _smtp(env: Environment, t: Target, domain: str, sender: str, recipients: tuple[str, ...],
                msg: MessageSource, partial: bool, mode: TlsMode, seen: bool) -> Outcome | None:
    """SMTP to `t` (again without STARTTLS if its handshake failed); None if no connection."""
    cfg = env.config
    starttls = True
    name = _server_name(t)
    while True:
        key = (t.ip, t.smtp_port, cfg.helohost, mode, starttls, name)
        transaction = Transaction(helohost=cfg.helohost, sender=sender, recipients=recipients,
                                  partner=str(t.ip), domain=domain, tls=mode, starttls=starttls,
                                  partial_line=partial)
        kept = env.sessions.take(key) if env.sessions is not None else None
        if kept is not None:
            out = await drive(kept.chan, SmtpSession(transaction, kept.resume), msg.open, env.tls_context,
                              name, _keeper(env, key, kept.uses + 1))
            if not out.stale:
                return out
        try:
            reader, writer = await connect(t.ip, t.smtp_port, cfg.timeoutconnect)
        except ConnectFailed as e:
            env.tcpto.note(t.ip, e.timed_out, seen)
            env.log(f"remote: SMTP to {t.ip} port {t.smtp_port}: {clean(str(e))}")
            return None
        env.tcpto.note(t.ip, False, seen)
        seen = False
        out = await drive(Channel(reader, writer, cfg.timeoutremote), SmtpSession(transaction), msg.open,
                          env.tls_context, name, _keeper(env, key, 1))
        for note in out.notes:
            env.log("remote: " + clean(note))
        if not (out.plain_retry and starttls):
            return out
        env.log(f"remote: TLS with {t.ip} failed; trying it again without TLS")
        starttls = False


def _keeper(env: Environment, key: tuple, uses: int):
    """drive()'s `keep`: hand a connection that can carry another message to env.sessions."""
    if env.sessions is None:
        return None
    sessions = env.sessions

    def keep(chan: Channel, session: SmtpSession) -> bool:
        return sessions.keep(key, chan, Resume(session.ext, session.tls), uses)
    return keep


async def deliver_message(env: Environment, domain: str, sender: str, recipients: tuple[str, ...],
                          msg: MessageSource) -> Outcome:
    """One qmail-remote run: route, resolve, connect, talk; the report it would print."""
    cfg = env.config
    try:
        size, partial = msg.facts()
    except OSError:
        return report.message(Z, report.TEMP_READ)
    try:
        targets = await plan(env.lookup, domain, route(domain, cfg.smtproutes, cfg.qmtproutes),
                             cfg.smtpport, cfg.qmtpport, env.ipme, env.rng)
    except OSError:  # the interface list could not be had
        return report.message(Z, report.TEMP_OSERR)
    if isinstance(targets, Outcome):
        return targets
    mode = cfg.tlspolicy.mode(domain)
    failure: Outcome | None = None
    for t in targets:
        parked, seen = env.tcpto.check(t.ip, env.rng.randrange(32))
        if parked:
            env.log(f"remote: skipping {t.ip}: it timed out recently (qmail-tcpto lists it)")
            continue
        if t.qmtp and mode in (TlsMode.ENCRYPT, TlsMode.VERIFY):
            env.log(f"remote: not using QMTP to {t.ip}: TLS is required for {clean(domain)}")
        elif t.qmtp:
            out = await _qmtp(env, t, sender, recipients, msg, size, seen)
            if out is not None:
                return out
        out = await _smtp(env, t, domain, sender, recipients, msg, partial, mode, seen)
        if out is None:
            continue
        if not out.next_host:
            return out
        failure = out  # a TLS demand this host did not meet: the next may
    return failure or report.message(Z, report.NOCONN)


class RemoteDelivery:
    """The scheduler's remote channel (see the module docstring)."""

    def __init__(self, root: Root, log: Log, *, clean_tcpto: bool = True):
        self.root = root
        self.log = log
        self.tcpto = TcptoFiles(os.path.join(root.queue_dir, "lock"))
        self.rng = random.Random()
        self._lookup: tuple[object, DnsLookup] | None = None
        self._contexts: tuple[object, dict[bool, ssl.SSLContext]] | None = None
        self.sessions = SessionCache()
        self._env: tuple[float, Environment] | None = None
        if clean_tcpto:
            try:
                self.tcpto.clear()
            except OSError:
                pass

    def environment(self) -> Environment:
        """Control files read within CONTROL_TTL seconds; ControlError if one is unreadable."""
        now = time.monotonic()
        if self._env is None or now - self._env[0] >= CONTROL_TTL:
            self._env = (now, self._read_environment())
        return self._env[1]

    def reread(self) -> None:
        """The next delivery reads the control files afresh (SIGHUP)."""
        self._env = None

    def _read_environment(self) -> Environment:
        cfg = RemoteConfig.from_control(self.root.control)
        key = (cfg.resolvers, cfg.timeoutdns)
        if self._lookup is None or self._lookup[0] != key:
            self._lookup = (key, DnsLookup(cfg.resolvers, cfg.timeoutdns))
        ca_key = (cfg.tlsca, os.stat(cfg.tlsca).st_mtime_ns if cfg.tlsca else None)
        if self._contexts is None or self._contexts[0] != ca_key:
            self._contexts = (ca_key, {})
        return Environment(cfg, self._lookup[1], self.tcpto, self.log, self.rng, self._contexts[1], self.sessions)

    async def close(self) -> None:
        """QUIT the connections kept for more messages (at shutdown)."""
        await self.sessions.close()

    async def deliver(self, sender: str, recipients: list[str], messpath: str) -> list[tuple[str, str]]:
        """One (K|Z|D, text) per recipient, in order; all recipients share one domain."""
        if not recipients:
            return []
        try:
            env = self.environment()
        except (ControlError, OSError):
            return [(Z, report.TEMP_CONTROL)] * len(recipients)
        domain = recipients[0].rpartition("@")[2]
        if not domain:
            return [(report.D, report.perm_dns(domain))] * len(recipients)
        out = await deliver_message(env, domain, sender, tuple(recipients), MessageSource(path=messpath))
        return report.per_recipient(out, len(recipients))
