"""qmail-inject's work: header rewriting, recipients, the hand-off (qmail-inject(8), qmail-header(5)).

Re-created from qmail 1.03's qmail-inject.c. The header is read (bounded,
see miniqmail.headers), every address field is rewritten and refolded, the
fields qmail adds go above the original ones, and the message -- the new
header followed by the rest of the input, streamed -- goes to the hand-off
in this process, or to stdout with `-n`. Environment and control files as in
qmail-inject(8): see `load()`.

Where this differs from qmail-inject. Refused, one line on stderr and exit
100, before anything is sent, where qmail would send something half right:
  * an address with more or less than one `@` after qualification, nothing
    on one side of it, or a stray `<`, `>`, `,`, `:` or `;` in it (`a@@b`,
    `Joe <joe@x`, an argument `a@@b`) -- qmail passes these on;
  * a recipient that is empty (`To: <>`, an argument `''` or `<>`);
  * no recipients at all when queueing (qmail queues the message, and the
    smart host's QMQP server would refuse it);
  * a parse error in To/Cc/Bcc (fatal as in qmail 1.03; notqmail skips it);
  * a header over miniqmail.headers' limits (qmail has none but memory).
Accepted: an argument or `-f` in angle brackets loses them, so `-f '<>'` is
the null sender (qmail would make it `"<>"@defaulthost`). Error lines show
the offending field on the same line (qmail prints it on the next).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable, Mapping, cast

from miniqmail import headers
from miniqmail.address import (AT, ATOM, COLON, COMMENT, LEFT, QUOTE, RIGHT, AddressError, Qualifier, Token,
                               addrlist, check, envelope_form, quote2, quote_need, tokenize, unparse, unquote)
from miniqmail.control import Control, ControlError
from miniqmail.datefmt import date822
from miniqmail.handoff import handoff
from miniqmail.progmain import fatal

#: Fields whose presence makes a message "resent" (qmail-header(5)).
RESENT = frozenset((b"resent-sender", b"resent-from", b"resent-reply-to", b"resent-to", b"resent-cc",
                    b"resent-bcc", b"resent-date", b"resent-message-id"))
_NORMAL_TO = frozenset((b"to", b"cc", b"bcc", b"apparently-to"))
_RESENT_TO = frozenset((b"resent-to", b"resent-cc", b"resent-bcc"))
#: Fields whose addresses are rewritten: these, the senders and Return-Path.
_ADDRESSED = _NORMAL_TO | _RESENT_TO | frozenset((
    b"sender", b"from", b"reply-to", b"return-receipt-to", b"errors-to", b"resent-sender", b"resent-from",
    b"resent-reply-to", b"return-path"))
#: Read but never passed on.
_DROPPED = frozenset((b"bcc", b"resent-bcc", b"return-path", b"content-length"))


class Fatal(Exception):
    """The program stops: `code` is its exit status, `reason` the text after `fatal: `."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Options:
    """What the command line says. Strings hold one character per byte (latin-1)."""

    recipients: str = "A"  # -A (args, else header), -a (args), -h (header), -H (both)
    queue: bool = True  # -N; False is -n (print instead)
    sender: str | None = None  # -f
    args: tuple[str, ...] = ()
    crlf: bool = False  # turn CR LF into LF (the sendmail wrapper's choice, not qmail-inject's)
    prog: str = "qmail-inject"


@dataclass(frozen=True)
class Settings:
    """What the environment and the control files say, read once at start-up."""

    qualifier: Qualifier
    idhost: str
    user: str  # From: user, host and name
    host: str | None
    name: str | None
    ruser: str  # envelope sender user and host
    rhost: str | None
    flags: str  # $QMAILINJECT
    mft: frozenset[str] | None  # $QMAILMFTFILE's addresses, lower-cased


def environment() -> dict[str, str]:
    """The environment, each byte one character."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in os.environb.items()}


def _latin(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("latin-1")


def _first(env: Mapping[str, str], *names: str) -> str | None:
    return next((env[n] for n in names if n in env), None)


def _shown(text: str | bytes, limit: int = 200) -> str:
    """A field or address as one printable line for an error message."""
    raw = text.encode("latin-1") if isinstance(text, str) else text
    line = " ".join(raw.decode("utf-8", "replace").split())
    return line if len(line) <= limit else line[:limit] + "..."


def load(env: Mapping[str, str], root: str) -> Settings:
    """qmail-inject's start-up: $QMAILMFTFILE, then control/ under `root`, then the variables."""
    mft = None
    if "QMAILMFTFILE" in env:
        path = os.fsdecode(env["QMAILMFTFILE"].encode("latin-1"))
        try:
            lines = Control(os.path.dirname(path) or ".").lines(os.path.basename(path))
        except ControlError as e:
            raise Fatal(111, str(e)) from None
        if lines is not None:
            mft = frozenset(_latin(x).lower() for x in lines)
    if not os.path.isdir(root):
        raise Fatal(111, f"unable to switch to {root}: no such directory")
    control = Control(os.path.join(root, "control"))
    values = {}
    try:
        control.line("me")  # qmail reads it first: unreadable is an error even when unused
        for name in ("defaultdomain", "defaulthost", "plusdomain", "idhost"):
            values[name] = _latin(control.me_default(name, name))
    except ControlError as e:
        raise Fatal(111, str(e)) from None
    for name in values:
        values[name] = env.get("QMAIL" + name.upper(), values[name])
    try:
        qualifier = Qualifier(values["defaulthost"], values["defaultdomain"], values["plusdomain"])
    except AddressError:
        raise Fatal(100, "unable to parse defaulthost, defaultdomain or plusdomain") from None
    user = _first(env, "QMAILUSER", "MAILUSER", "USER", "LOGNAME")
    if user is None:
        user = "anonymous"
    host = _first(env, "QMAILHOST", "MAILHOST")
    return Settings(qualifier, values["idhost"], user, host, _first(env, "QMAILNAME", "MAILNAME", "NAME"),
                    env.get("QMAILSUSER", user), env.get("QMAILSHOST", host), env.get("QMAILINJECT", ""), mft)


def plain_address(text: str, q: Qualifier, null_ok: bool) -> str:
    """An argument or `-f` value qualified as qmail-inject does; AddressError says why not."""
    if len(text) >= 2 and text[0] == "<" and text[-1] == ">":
        text = text[1:-1]
    if not text and null_ok:
        return ""
    local, at, _ = text.rpartition("@")
    if at and (not local or "@" in local):
        raise AddressError("an address needs exactly one @ with something before it")
    tokens = q.rewrite(tokenize(quote2(text)))
    problem = check(tokens, null_ok)
    if problem:
        raise AddressError(problem)
    return unquote(tokens)


class Injector:
    """One message's header work: fields in, new header and recipients out (a mutable engine).

    Recipients from the header are kept with the field they came from, for
    the error message should one turn out to be unusable.
    """

    def __init__(self, settings: Settings, opts: Options, now: float, pid: int):
        self.settings, self.opts, self.now, self.pid = settings, opts, now, pid
        self.sender: str | None = None
        self.args: list[str] = []
        self.seen: set[bytes] = set()
        self.saved: list[bytes] = []
        self.normal: list[tuple[str, bytes]] = []  # To Cc Bcc Apparently-To
        self.resent: list[tuple[str, bytes]] = []  # Resent-To Resent-Cc Resent-Bcc
        self.tocc: list[str] = []
        q = self.settings.qualifier
        if self.opts.sender is not None:
            try:
                self.sender = plain_address(self.opts.sender, q, null_ok=True)
            except AddressError as e:
                raise Fatal(100, f"unable to parse this line: {_shown(self.opts.sender)} ({e})") from None
        strategy = self.opts.recipients
        if strategy == "A":
            strategy = "a" if self.opts.args else "h"
        if strategy != "h":
            for arg in self.opts.args:
                try:
                    self.args.append(plain_address(arg, q, null_ok=False))
                except AddressError as e:
                    raise Fatal(100, f"unable to parse address: {_shown(arg)} ({e})") from None
        self.use_header = strategy != "a"

    def _rewriter(self, name: bytes, line: bytes) -> Callable[[list[Token]], list[Token]] | None:
        flags = self.settings.flags

        def rewrite(a: list[Token]) -> list[Token]:
            a = self.settings.qualifier.rewrite(a)
            problem = check(a, null_ok=True)
            if problem:
                raise AddressError(problem)
            address = unquote(a)
            if name == b"return-path":
                if self.sender is None:  # the first one counts, unless -f said otherwise
                    self.sender = address + ("-@[]" if "r" in flags else "")
            elif name in _NORMAL_TO:
                self.normal.append((address, line))
                if name in (b"to", b"cc"):
                    self.tocc.append(address)
            elif name in _RESENT_TO:
                self.resent.append((address, line))
            return a

        return rewrite if name in _ADDRESSED else None

    def take(self, line: bytes) -> None:
        """One header field, as doheaderfield() takes it."""
        name = headers.known(line)
        flags = self.settings.flags
        if (name == b"from" and "f" in flags) or (name == b"message-id" and "i" in flags) \
                or (name == b"return-path" and "s" in flags):
            return
        if name is not None:
            self.seen.add(name)
            rewrite = self._rewriter(name, line)
            if rewrite is not None:
                line = self._rewrite(line, rewrite)
            if name in _DROPPED:
                return
        self.saved.append(line)

    @staticmethod
    def _rewrite(line: bytes, rewrite: Callable[[list[Token]], list[Token]]) -> bytes:
        try:
            return unparse(addrlist(tokenize(line.decode("latin-1")), rewrite)).encode("latin-1")
        except AddressError as e:
            raise Fatal(100, f"unable to parse this line: {_shown(line)} ({e})") from None

    def _default_from(self) -> bytes:
        s = self.settings
        comment = s.name is not None and "c" in s.flags
        tokens = [Token(ATOM, "From"), Token(COLON)]
        if s.name is not None and not comment:
            tokens += [Token(QUOTE, s.name), Token(LEFT)]
        tokens.append(Token(QUOTE if quote_need(s.user) else ATOM, s.user))
        if s.host is not None:
            tokens += [Token(AT), Token(ATOM, s.host)]
        if s.name is not None:
            tokens.append(Token(COMMENT, s.name) if comment else Token(RIGHT))
        # Printed and parsed again, as qmail does, so that the parts join into proper tokens.
        return self._rewrite(unparse(tokens).encode("latin-1"), self._rewriter(b"from", b"") or (lambda a: a))

    def _default_sender(self) -> None:
        s = self.settings
        user = s.ruser
        if "m" in s.flags:
            user += f"-{int(self.now)}.{self.pid}"
        if "r" in s.flags:
            user += "-"
        tokens = [Token(ATOM, "Return-Path"), Token(COLON), Token(QUOTE, user)]
        if s.rhost is not None:
            tokens += [Token(AT), Token(ATOM, s.rhost)]
        self._rewrite(unparse(tokens).encode("latin-1"), self._rewriter(b"return-path", b"") or (lambda a: a))
        if self.sender is None:  # only an empty address list gets here
            self.sender = ""

    def head(self) -> bytes:
        """The new header: added fields first, then the original ones (finishheader())."""
        if self.sender is None:
            self._default_sender()
        assert self.sender is not None
        out: list[bytes] = []
        if not self.opts.queue:
            out.append(b"Return-Path: <" + quote2(self.sender).encode("latin-1") + b">\n")
        resent = bool(self.seen & RESENT)
        prefix = b"Resent-" if resent else b""

        def absent(name: bytes) -> bool:
            return prefix.lower() + name not in self.seen

        if absent(b"date"):
            out.append(prefix + b"Date: " + date822(self.now).encode() + b"\n")
        if absent(b"message-id"):
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(self.now))
            out.append(prefix + f"Message-ID: <{stamp}.{self.pid}.qmail@".encode()
                       + self.settings.idhost.encode("latin-1") + b">\n")
        if absent(b"from"):
            out.append(prefix + self._default_from())
        if absent(b"to") and absent(b"cc"):
            out.append(prefix + b"Cc: recipient list not shown: ;\n")
        if not resent:
            out.append(self._followup())
        return b"".join(out) + b"".join(self.saved)

    def _followup(self) -> bytes:
        mft = self.settings.mft
        if mft is None or b"mail-followup-to" in self.seen or not any(a.lower() in mft for a in self.tocc):
            return b""
        listed = ",\n  ".join(quote2(a) for a in reversed(self.tocc))
        return b"Mail-Followup-To: " + listed.encode("latin-1") + b"\n"

    def recipients(self) -> list[str]:
        """Arguments first, then the header's, each field's right to left; [] is refused."""
        found = list(self.args)
        if self.use_header:
            for address, line in self.resent if self.seen & RESENT else self.normal:
                if not address:
                    raise Fatal(100, f"<> is not a recipient: {_shown(line)}")
                found.append(address)
        if not found:
            where = "the arguments or the header's To:, Cc: and Bcc:" if self.use_header else "the arguments"
            raise Fatal(100, f"no recipients: none in {where}; nothing was sent")
        return found


def inject(stdin: BinaryIO | None, stdout: BinaryIO | None, opts: Options, env: Mapping[str, str],
           root: str) -> int:
    """Do qmail-inject's whole job; returns the exit code after printing any error line."""
    try:
        return _inject(stdin, stdout, opts, env, root)
    except Fatal as e:
        return fatal(opts.prog, e.reason, e.code)


def _inject(stdin: BinaryIO | None, stdout: BinaryIO | None, opts: Options, env: Mapping[str, str],
            root: str) -> int:
    injector = Injector(load(env, root), opts, time.time(), os.getpid())
    if stdin is None:
        raise Fatal(111, "read error: no standard input")
    try:
        header = headers.read(stdin, opts.crlf)
    except headers.HeaderError as e:
        raise Fatal(100, f"{e}; nothing was sent") from None
    except OSError as e:
        raise Fatal(111, f"read error: {e.strerror or e}") from None
    for line in header.fields:
        injector.take(line)
    head = injector.head() + (header.after or b"")
    message = headers.Message(head, stdin if header.after is not None else None, opts.crlf)
    if not opts.queue:
        return _print(message, stdout)
    recipients = injector.recipients()
    assert injector.sender is not None
    result = handoff(cast(BinaryIO, message), envelope_form(injector.sender), [envelope_form(r) for r in recipients], root=root)
    if result.ok:
        return 0
    raise Fatal(100 if result.permanent else 111, result.text[1:])


def _print(message: headers.Message, stdout: BinaryIO | None) -> int:
    if stdout is None:
        raise Fatal(111, "unable to write: no standard output")
    while True:
        try:
            chunk = message.read(1 << 16)
        except OSError as e:
            raise Fatal(111, f"read error: {e.strerror or e}") from None
        if not chunk:
            break
        try:
            stdout.write(chunk)
        except OSError as e:
            raise Fatal(111, f"unable to write: {e.strerror or e}") from None
    try:
        stdout.flush()
    except OSError as e:
        raise Fatal(111, f"unable to write: {e.strerror or e}") from None
    return 0
