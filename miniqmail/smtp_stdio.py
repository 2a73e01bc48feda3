"""`sendmail -bs`: an SMTP session on stdin/stdout that feeds the hand-off (qmail-smtpd(8), RFC 5321).

qmail's sendmail runs qmail-smtpd for `-bs`, with RELAYCLIENT set and the
client posing as sendmail-bs@127.0.0.1; this is the same session in
process: HELO/EHLO, MAIL, RCPT, DATA, RSET, NOOP, VRFY, HELP, QUIT with
qmail-smtpd's replies. The message is the client's, untouched but for
qmail-smtpd's Received line: no qualification, no added fields.

`Session` is the pure part (a line in, a reply out); `DataReader` decodes
DATA (CR LF to LF, dot-unstuffing, the end at `.` alone) as a stream the
hand-off reads, so a message is never held whole; `serve()` joins them.

Stricter than qmail-smtpd: a command line over `LINE_MAX` bytes is refused
(500), so is HELO/EHLO without a name (501), a second MAIL inside a
transaction (503), `RCPT TO:<>` (553) and more than `RCPT_MAX` recipients
(452). Like qmail-smtpd, a bare LF inside DATA ends the session with 451.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from typing import BinaryIO, cast

from miniqmail.address import envelope_form
from miniqmail.control import Control, ControlError
from miniqmail.datefmt import date822
from miniqmail.handoff import HandoffResult, handoff
from miniqmail.headers import Message

#: A command line, CR LF included (RFC 5321 allows 512; addresses may be longer).
LINE_MAX = 1000
#: qmail-smtpd's addrparse() refuses longer addresses.
ADDRESS_MAX = 900
RCPT_MAX = 10000
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.@%+/=:-")
STRAY_NEWLINE = "451 See https://cr.yp.to/docs/smtplf.html."
BARE_LF = "a line ends in LF without CR"


class DataError(OSError):
    """DATA that cannot be taken: a bare LF, or the input ended before the final dot."""


@dataclass(frozen=True)
class Reply:
    text: str
    action: str = ""  # "data": the message follows; "quit": the session is over


def parse_path(arg: str, keyword: str) -> str | None:
    """The address of `FROM:<addr> [params]` (or `TO:`), unquoted and without a source route."""
    if arg[:len(keyword) + 1].upper() != keyword + ":":
        return None
    rest = arg[len(keyword) + 1:].lstrip(" ")
    bracketed = rest.startswith("<")
    out: list[str] = []
    quoted = escaped = False
    i = 1 if bracketed else 0
    for i in range(i, len(rest)):
        c = rest[i]
        if escaped:
            out.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif not quoted and c == (">" if bracketed else " "):
            break
        else:
            out.append(c)
    else:
        if bracketed or quoted or escaped:
            return None  # no closing '>', or an open quote
        i = len(rest)
    if bracketed and rest[i + 1:i + 2] not in ("", " "):
        return None
    address = "".join(out)
    if address.startswith("@"):  # <@relay,@relay:user@host>
        _, colon, address = address.partition(":")
        if not colon:
            return None
    if len(address) > ADDRESS_MAX or "\0" in address or "\r" in address or "\n" in address:
        return None
    return address


@dataclass
class Session:
    """One SMTP session's state and replies, with no I/O."""

    greeting: str
    helo: str = "localhost"  # qmail-smtpd starts as if the client had said its own name
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)

    def banner(self) -> str:
        return f"220 {self.greeting} ESMTP"

    def command(self, line: bytes) -> Reply:
        text = line.rstrip(b"\n").rstrip(b"\r").decode("latin-1")
        verb, _, arg = text.partition(" ")
        verb = verb.lower()
        if verb in ("helo", "ehlo"):
            if not arg.strip():
                return Reply("501 syntax error: give your host name (#5.5.4)")
            self.helo, self.sender, self.recipients = arg.strip(), None, []
            if verb == "helo":
                return Reply(f"250 {self.greeting}")
            return Reply(f"250-{self.greeting}\r\n250-PIPELINING\r\n250 8BITMIME")
        if verb == "mail":
            if self.sender is not None:
                return Reply("503 nested MAIL command (#5.5.1)")
            address = parse_path(arg, "FROM")
            if address is None:
                return Reply("555 syntax error (#5.5.4)")
            self.sender, self.recipients = address, []
            return Reply("250 ok")
        if verb == "rcpt":
            if self.sender is None:
                return Reply("503 MAIL first (#5.5.1)")
            address = parse_path(arg, "TO")
            if address is None:
                return Reply("555 syntax error (#5.5.4)")
            if not address:
                return Reply("553 sorry, <> is no recipient (#5.1.1)")
            if len(self.recipients) >= RCPT_MAX:
                return Reply("452 too many recipients (#4.5.3)")
            self.recipients.append(address)
            return Reply("250 ok")
        if verb == "data":
            if self.sender is None:
                return Reply("503 MAIL first (#5.5.1)")
            if not self.recipients:
                return Reply("503 RCPT first (#5.5.1)")
            return Reply("354 go ahead", "data")
        if verb == "rset":
            self.sender, self.recipients = None, []
            return Reply("250 flushed")
        if verb == "noop":
            return Reply("250 ok")
        if verb == "vrfy":
            return Reply("252 send some mail, i'll try my best")
        if verb == "help":
            return Reply("214 commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT")
        if verb == "quit":
            return Reply(f"221 {self.greeting}", "quit")
        return Reply("502 unimplemented (#5.5.1)")

    def received(self, when: float) -> bytes:
        """qmail-smtpd's Received line for a sendmail -bs client."""
        helo = "" if self.helo.lower() == "localhost" else f" (HELO {_safe(self.helo)})"
        return (f"Received: from localhost{helo} (sendmail-bs@127.0.0.1)\n"
                f"  by localhost with SMTP; {date822(when)}\n").encode()

    def finished(self, result: HandoffResult, when: float) -> str:
        """The reply to the end of DATA; the transaction is over either way."""
        self.sender, self.recipients = None, []
        if result.ok:
            return f"250 ok {int(when)} qp {os.getpid()}"
        return ("554 " if result.permanent else "451 ") + result.text[1:]


def _safe(text: str) -> str:
    return "".join(c if c in _SAFE else "?" for c in text)


class DataReader(io.RawIOBase):
    """The message of one DATA command, read from `stream` up to the line holding only a dot."""

    def __init__(self, stream: BinaryIO, piece: int = 65536):
        super().__init__()
        self._stream = stream
        # A longer line arrives in pieces; the end, `.` CR LF, must fit in one.
        self._piece_max = max(piece, 3)
        self._line_start = True
        self._held_cr = False
        self._pending = b""
        self.done = False
        self.error: DataError | None = None

    def readable(self) -> bool:
        return True

    def _piece(self) -> bytes:
        piece = self._stream.readline(self._piece_max)
        if not piece:
            raise DataError("the input ended inside DATA")
        if self._held_cr:  # a CR at the end of the last piece, its LF may be here
            self._held_cr = False
            if piece == b"\n":
                self._line_start = True
                return b"\n"
            piece = b"\r" + piece
        elif self._line_start:
            if piece == b".\r\n":
                self.done = True
                return b""
            if piece.startswith(b"."):
                piece = piece[1:]
        if piece.endswith(b"\r\n"):
            self._line_start = True
            return piece[:-2] + b"\n"
        if piece.endswith(b"\n"):
            raise DataError(BARE_LF)
        self._line_start = False
        if piece.endswith(b"\r"):
            self._held_cr = True
            return piece[:-1]
        return piece

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.error is not None:
            raise self.error  # the stream is no longer at a line boundary: stop for good
        try:
            while not self._pending and not self.done:
                self._pending = self._piece()
        except DataError as e:
            self.error = e
            raise
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def drain(self) -> None:
        while self.read(65536):
            pass


def _greeting(root: str) -> str | None:
    control = Control(os.path.join(root, "control"))
    try:
        return control.line("smtpgreeting") or control.line("me")
    except ControlError:
        return None


def serve(stdin: BinaryIO, stdout: BinaryIO, root: str) -> int:
    """Run one session; 0 after QUIT, 1 when the input ends or breaks the protocol (as qmail-smtpd)."""

    def say(text: str) -> None:
        stdout.write(text.encode("latin-1") + b"\r\n")
        stdout.flush()

    greeting = _greeting(root)
    if greeting is None:
        say("421 unable to read controls (#4.3.0)")
        return 1
    session = Session(greeting)
    say(session.banner())
    while True:
        line = stdin.readline(LINE_MAX + 1)
        if not line:
            return 1
        if len(line) > LINE_MAX and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = stdin.readline(65536)
            say("500 line too long (#5.5.2)")
            continue
        reply = session.command(line)
        say(reply.text)
        if reply.action == "quit":
            return 0
        if reply.action == "data":
            assert session.sender is not None
            now = time.time()
            reader = DataReader(stdin)
            message = Message(session.received(now), cast(BinaryIO, reader), fix_eol=False)
            result = handoff(cast(BinaryIO, message), envelope_form(session.sender),
                             [envelope_form(r) for r in session.recipients], root=root)
            try:
                reader.drain()  # all read already, unless the hand-off gave up before reading
            except DataError as e:
                if e.args[0] == BARE_LF:
                    say(STRAY_NEWLINE)
                return 1
            say(session.finished(result, now))
