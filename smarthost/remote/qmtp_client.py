"""QMTP client (cr.yp.to/proto/qmtp.txt), as the qmtpc patch adds it to qmail-remote(8).

One package per connection: a netstring holding `\\n` (the LF encoding, so the
queued message goes as it is) and the message, the sender's netstring, and one
netstring holding a netstring per recipient. The server answers once per
recipient, in order, with a netstring starting `K`, `Z` or `D`. An answer is
final for its recipient: when the connection dies after some `K`s, those
recipients are delivered and only the others are deferred.

The codec (`package_head`, `package_tail`, `Responses`, `outcome`) is pure;
`exchange()` is the asyncio part, over a `Channel`.
"""

from __future__ import annotations

from typing import BinaryIO

from miniqmail import netstring
from smarthost.remote.report import ACCEPTED, PERMANENT, TEMPORARY, D, K, Outcome, Z, dropped
from smarthost.remote.smtp_codec import REPORT_TEXT
from smarthost.remote.smtp_session import Died
from smarthost.remote.transport import READ_CHUNK, Channel

#: bytes one response may hold (they are short sentences)
MAX_RESPONSE = 65536


class QmtpError(ValueError):
    """The server's answer is not QMTP."""


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def package_head(size: int) -> bytes:
    """The start of the message netstring for a message of `size` bytes, encoding byte included."""
    return netstring.header(size + 1) + b"\n"


def package_tail(sender: str, recipients: list[str] | tuple[str, ...]) -> bytes:
    """The comma that ends the message, the sender, and the recipients."""
    inner = b"".join(netstring.encode(_b(r)) for r in recipients)
    return b"," + netstring.encode(_b(sender)) + netstring.encode(inner)


class Responses:
    """Decodes the `expected` answers; feed bytes, take (letter, text) pairs. Bytes after
    the last expected answer are never looked at."""

    def __init__(self, expected: int, limit: int = MAX_RESPONSE):
        self.left = expected
        self.limit = limit
        self._dec = netstring.Decoder(limit)
        self._data: list[bytes] = []

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        out = []
        view = memoryview(data)
        while len(view) and self.left:
            try:
                used = self._dec.feed(bytes(view))
            except netstring.NetstringError as e:
                raise QmtpError(str(e)) from None
            view = view[used:]
            self._data += self._dec.take()
            if not self._dec.done:
                break
            answer = b"".join(self._data)
            self._dec, self._data = netstring.Decoder(self.limit), []
            self.left -= 1
            if not answer or answer[:1] not in (b"K", b"Z", b"D"):
                raise QmtpError("an answer that does not start with K, Z or D")
            text = answer[1:REPORT_TEXT + 1].replace(b"\0", b"?").replace(b"\r", b"")
            out.append((chr(answer[0]), text.decode("utf-8", "surrogateescape")))
        return out


def outcome(partner: str, answers: list[tuple[str, str]], count: int,
            died: str | None = None, critical: bool = False) -> Outcome:
    """qmail-remote's report for the answers that came (and how the connection ended)."""
    rcpts = []
    accepted: str | None = None
    for letter, text in answers[:count]:
        if letter == K:
            rcpts.append((ACCEPTED, ""))
            accepted = text if accepted is None else accepted
        else:
            code = PERMANENT if letter == D else TEMPORARY
            rcpts.append((code, f"{partner} does not like recipient.\nRemote host said: {text}\n"))
    if died is not None:
        text = dropped(partner, died, critical)
        if accepted is None:
            return Outcome(Z, text, rcpts)
        rcpts += [(TEMPORARY, text)] * (count - len(rcpts))
    if accepted is not None:
        return Outcome(K, f"{partner} accepted message.\nRemote host said: {accepted}\n", rcpts)
    return Outcome(D, f"Giving up on {partner}.\n", rcpts)


async def exchange(chan: Channel, partner: str, sender: str, recipients: tuple[str, ...],
                   body: BinaryIO, size: int) -> Outcome:
    """Send one package and read the answers; closes the channel."""
    answers: list[tuple[str, str]] = []
    critical = False
    phase = "while sending the message"
    try:
        await chan.send(package_head(size))
        left = size
        while left > 0:
            chunk = body.read(min(READ_CHUNK, left))
            if not chunk:
                raise chan.die("The message file ended early")
            await chan.send(chunk)
            left -= len(chunk)
        await chan.send(package_tail(sender, recipients))
        critical = True
        phase = "waiting for the answers"
        resp = Responses(len(recipients))
        while len(answers) < len(recipients):
            try:
                answers += resp.feed(await chan.read_some())
            except QmtpError as e:
                raise chan.die(f"Not QMTP: {e}") from None
        return outcome(partner, answers, len(recipients))
    except Died as e:
        return outcome(partner, answers, len(recipients), f"{e.cause} {phase}.", critical)
    except OSError as e:
        chan.dead = True
        return outcome(partner, answers, len(recipients), f"Unable to read the message ({e.strerror}).")
    finally:
        chan.dead = True  # QMTP has no QUIT: just close
        await chan.close()
