"""The SMTP client dialogue of qmail-remote(8), without sockets (RFC 5321, RFC 3207, RFC 2920).

`SmtpSession.run()` is a generator: it yields what it wants done (`Send`,
`READ` a reply, `StartTls`, `BODY` = stream the message) and is sent the
results; the transport throws `Died` or `TlsFailed` into it when the
connection fails. It returns an `Outcome`. Tests drive it with canned replies.

qmail's dialogue, step for step, with what goes beyond qmail made explicit:
EHLO first and HELO when EHLO gets a 5xx; STARTTLS when offered and allowed
by the destination's TLS policy; `BODY=8BITMIME` when offered; MAIL, RCPT and
DATA sent in batches when PIPELINING is offered; every recipient of the
transaction in one envelope. A session may also go on over a connection an
earlier transaction left open (`Resume`, see smarthost.remote.sessions): then
it starts at MAIL FROM, and a connection that fails before the server answers
it ends `stale`, so the caller can try a fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator

from smarthost.remote.report import (ACCEPTED, BAD_RECIPIENT, BAD_SENDER, D, K, PARTIAL, PERMANENT, TEMPORARY, Z,
                                     Outcome, dropped)
from smarthost.remote.smtp_codec import Reply, smtp_path, unsafe_address
from smarthost.remote.tlspolicy import TlsMode

#: RCPT commands sent before reading their replies, so neither side's buffers can fill up.
PIPELINE_BATCH = 100


@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class StartTls:
    verify: bool


@dataclass(frozen=True)
class TlsInfo:
    version: str
    cipher: str
    verified: bool


@dataclass(frozen=True)
class Resume:
    """What an earlier session on the same connection learnt."""

    ext: dict[str, str]
    tls: TlsInfo | None


class _Read:
    """Wants the next reply."""


class _Body:
    """Wants the message streamed, dot-stuffed, with the final dot line."""


READ = _Read()
BODY = _Body()
Op = Send | StartTls | _Read | _Body


class Died(Exception):
    """The connection failed; `cause` says how ("The connection closed", …)."""

    def __init__(self, cause: str):
        super().__init__(cause)
        self.cause = cause


class TlsFailed(Exception):
    """The TLS handshake (or the certificate check) failed; the connection is gone."""


@dataclass(frozen=True)
class Transaction:
    helohost: str
    sender: str
    recipients: tuple[str, ...]
    partner: str                   # the address as reports name it
    domain: str                    # the recipients' domain, for TLS texts
    tls: TlsMode = TlsMode.MAY
    starttls: bool = True          # False: stay in cleartext even if offered
    partial_line: bool = False     # the message does not end with LF
    batch: int = PIPELINE_BATCH


class SmtpSession:
    def __init__(self, t: Transaction, resume: Resume | None = None):
        self.t = t
        self.resume = resume
        self.ext: dict[str, str] = resume.ext if resume else {}
        self.heard = False         # the server answered MAIL FROM (a kept connection works)
        self.reusable = False      # the transaction ended cleanly: the connection may carry another
        self.rcpts: list[tuple[str, str]] = []
        self.notes: list[str] = []
        self.critical = False      # the final dot is sent and its reply not read
        self.phase = "at the greeting"
        self.tls: TlsInfo | None = resume.tls if resume else None

    def run(self) -> Generator[Op, Any, Outcome]:
        try:
            out = yield from self._dialogue()
        except Died as e:
            out = Outcome(Z, dropped(self.t.partner, f"{e.cause} {self.phase}.", self.critical))
            out.stale = self.resume is not None and not self.heard
        out.rcpts = self.rcpts
        out.notes = self.notes + out.notes
        return out

    # -- texts (qmail-remote's quit(): prefix, host, suffix, '.', the reply) -----
    def _end(self, letter: str, prefix: str, suffix: str, reply: Reply | None = None) -> Outcome:
        said = reply.said() if reply else ""
        return Outcome(letter, f"{prefix}{self.t.partner}{suffix}.\n{said}")

    def _policy(self, why: str, reply: Reply | None = None) -> Outcome:
        said = reply.said() if reply else ""
        text = (f"Connected to {self.t.partner} but {why}; TLS is required for {self.t.domain}. "
                f"(#4.7.5)\n{said}")
        return Outcome(Z, text, next_host=True)

    # -- the dialogue -------------------------------------------------------------
    def _dialogue(self) -> Generator[Op, Any, Outcome]:
        if self.resume is None:
            ext = yield from self._open()
            if isinstance(ext, Outcome):
                return ext
            self.ext = ext
        return (yield from self._transaction(self.ext))

    def _open(self) -> Generator[Op, Any, dict[str, str] | Outcome]:
        """Greeting, EHLO, STARTTLS: the extensions the transaction may use, or the end."""
        t = self.t
        greeting = yield READ
        if greeting.code != 220:
            return self._end(Z, "Connected to ", " but greeting failed", greeting)
        ext = yield from self._hello()
        if isinstance(ext, Outcome):
            return ext
        required = t.tls in (TlsMode.ENCRYPT, TlsMode.VERIFY)
        if t.tls is not TlsMode.NONE and t.starttls and "STARTTLS" in ext:
            self.phase = "after STARTTLS"
            yield Send(b"STARTTLS\r\n")
            reply = yield READ
            if reply.code == 220:
                try:
                    self.tls = yield StartTls(verify=t.tls is TlsMode.VERIFY)
                except TlsFailed as e:
                    text = f"Connected to {t.partner} but the TLS handshake failed: {e}. (#4.7.5)\n"
                    return Outcome(Z, text, next_host=required, plain_retry=not required)
                info = self.tls
                self.notes.append(f"TLS to {t.partner} for {t.domain}: {info.version} {info.cipher}, "
                                  f"certificate {'verified' if info.verified else 'not verified'}")
                ext = yield from self._hello()  # RFC 3207: forget what was said in cleartext
                if isinstance(ext, Outcome):
                    return ext
            elif required:
                return self._policy("STARTTLS was refused", reply)
            else:
                self.notes.append(f"STARTTLS refused by {t.partner}: {reply.code}; going on without TLS")
        elif required:
            return self._policy("it does not offer STARTTLS")
        return ext

    def _transaction(self, ext: dict[str, str]) -> Generator[Op, Any, Outcome]:
        t = self.t
        if t.partial_line:
            return Outcome(D, PARTIAL)
        if unsafe_address(t.sender):
            return Outcome(D, BAD_SENDER)
        safe = [r for r in t.recipients if not unsafe_address(r)]
        if not safe:
            self._skip_unsafe()
            return self._end(D, "Giving up on ", "")
        mail = b"MAIL FROM:" + smtp_path(t.sender)
        if "8BITMIME" in ext:
            mail += b" BODY=8BITMIME"
        mail += b"\r\n"
        rcpts = [b"RCPT TO:" + smtp_path(r) + b"\r\n" for r in safe]
        if "PIPELINING" in ext:
            return (yield from self._pipelined(mail, rcpts))
        return (yield from self._one_by_one(mail, rcpts))

    def _hello(self) -> Generator[Op, Any, dict[str, str] | Outcome]:
        helo = self.t.helohost.encode("utf-8", "surrogateescape")
        self.phase = "after EHLO"
        yield Send(b"EHLO " + helo + b"\r\n")
        reply: Reply = yield READ
        if reply.code == 250:
            return reply.keywords()
        if reply.code >= 500:  # no ESMTP here (RFC 5321 §3.2): say HELO as qmail does
            self.phase = "after HELO"
            yield Send(b"HELO " + helo + b"\r\n")
            reply = yield READ
            if reply.code == 250:
                return {}
        return self._end(Z, "Connected to ", " but my name was rejected", reply)

    def _mail_reply(self, reply: Reply) -> None:
        """A kept connection whose server says it is closing (421) is stale, not an answer."""
        if self.resume is not None and reply.code == 421:
            raise Died("The server closed the kept connection")
        self.heard = True

    def _sender_rejected(self, reply: Reply) -> Outcome:
        return self._end(D if reply.code >= 500 else Z, "Connected to ", " but sender was rejected", reply)

    def _skip_unsafe(self) -> None:
        """Report the recipients that cannot go on the wire, up to the next one that can."""
        rs = self.t.recipients
        while len(self.rcpts) < len(rs) and unsafe_address(rs[len(self.rcpts)]):
            self.rcpts.append((PERMANENT, BAD_RECIPIENT))

    def _rcpt(self, reply: Reply) -> None:
        self._skip_unsafe()
        if reply.code >= 400:
            code = PERMANENT if reply.code >= 500 else TEMPORARY
            self.rcpts.append((code, f"{self.t.partner} does not like recipient.\n{reply.said()}"))
        else:
            self.rcpts.append((ACCEPTED, ""))
        self._skip_unsafe()

    def _accepted(self) -> bool:
        return any(code == ACCEPTED for code, _ in self.rcpts)

    def _one_by_one(self, mail: bytes, rcpts: list[bytes]) -> Generator[Op, Any, Outcome]:
        self.phase = "after MAIL FROM"
        yield Send(mail)
        reply = yield READ
        self._mail_reply(reply)
        if reply.code >= 400:
            return self._sender_rejected(reply)
        for cmd in rcpts:
            self.phase = "after RCPT TO"
            yield Send(cmd)
            self._rcpt((yield READ))
        if not self._accepted():
            return self._end(D, "Giving up on ", "")
        self.phase = "after DATA"
        yield Send(b"DATA\r\n")
        return (yield from self._data((yield READ)))

    def _pipelined(self, mail: bytes, rcpts: list[bytes]) -> Generator[Op, Any, Outcome]:
        pending = rcpts
        mail_reply: Reply | None = None
        while True:
            group, pending = pending[:self.t.batch], pending[self.t.batch:]
            head = [mail] if mail_reply is None else []
            tail = [] if pending else [b"DATA\r\n"]
            yield Send(b"".join(head + group + tail))
            if mail_reply is None:
                self.phase = "after MAIL FROM"
                mail_reply = yield READ
                self._mail_reply(mail_reply)
            for _ in group:
                self.phase = "after RCPT TO"
                reply = yield READ
                if mail_reply.code < 400:
                    self._rcpt(reply)
            if mail_reply.code >= 400 and pending:
                return self._sender_rejected(mail_reply)  # DATA was not sent yet
            if not pending:
                break
        self.phase = "after DATA"
        data_reply = yield READ
        if mail_reply.code >= 400 or not self._accepted():
            if data_reply.code // 100 == 3:
                # DATA went through although nothing else did (RFC 2920 §3.1): end an empty message.
                yield Send(b".\r\n")
                yield READ
            if mail_reply.code >= 400:
                return self._sender_rejected(mail_reply)
            return self._end(D, "Giving up on ", "")
        return (yield from self._data(data_reply))

    def _data(self, reply: Reply) -> Generator[Op, Any, Outcome]:
        if reply.code >= 500:
            return self._end(D, "", " failed on DATA command", reply)
        if reply.code // 100 != 3:
            # 4xx, or a 2xx that would make the server read the message as commands
            return self._end(Z, "", " failed on DATA command", reply)
        self.phase = "while sending the message"
        yield BODY
        self.critical = True
        self.phase = "after the end of the message"
        reply = yield READ
        self.critical = False
        self.reusable = reply.code != 421  # the server is back where a new MAIL FROM may come
        if reply.code >= 500:
            return self._end(D, "", " failed after I sent the message", reply)
        if reply.code >= 400:
            return self._end(Z, "", " failed after I sent the message", reply)
        return self._end(K, "", " accepted message", reply)
