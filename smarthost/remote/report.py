"""Results of one remote delivery, in qmail-remote(8)'s terms and texts.

A delivery attempt ends in an `Outcome`: a report per recipient that got one
(`r` accepted, `h` permanent, `s` temporary) and the message report (`K`, `Z`,
`D`). `wire()` is qmail-remote's output on fd 1; `per_recipient()` turns an
outcome into one (letter, text) per recipient the way qmail-rspawn reads it.
Texts follow qmail-remote.c word for word where qmail has them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

K, Z, D = "K", "Z", "D"
ACCEPTED, PERMANENT, TEMPORARY = "r", "h", "s"

NOCONN = "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"
TEMP_DNS = "Sorry, I couldn't find any host by that name. (#4.1.2)\n"
NOMX = "Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)\n"
AMBIGMX = ("Sorry. Although I'm listed as a best-preference MX or A for that host,\n"
           "it isn't in my control/locals file, so I don't treat it as local. (#5.4.6)\n")
NULLMX = "Sorry, that domain has a null MX record: it does not accept mail. (#5.1.10)\n"
PARTIAL = "SMTP cannot transfer messages with partial final lines. (#5.6.2)\n"
TEMP_READ = "Unable to read message. (#4.3.0)\n"
TEMP_CONTROL = "Unable to read control files. (#4.3.0)\n"
TEMP_OSERR = "System resources temporarily unavailable. (#4.3.0)\n"
USAGE = "I (qmail-remote) was invoked improperly. (#5.3.5)\n"
BAD_SENDER = "Sorry, the envelope sender contains a line break or NUL. (#5.1.7)\n"
BAD_RECIPIENT = "Sorry, that address contains a line break or NUL. (#5.1.3)\n"


def outsafe(text: str) -> str:
    """A name as qmail-remote prints it: bytes outside 33..126 become '?'."""
    return "".join(c if 33 <= ord(c) <= 126 else "?" for c in text)


def perm_dns(host: str) -> str:
    return f"Sorry, I couldn't find any host named {outsafe(host)}. (#5.1.2)\n"


def dropped(partner: str, detail: str, critical: bool) -> str:
    """The connection died or the peer stopped making sense (qmail-remote's dropped())."""
    dup = "Possible duplicate! " if critical else ""
    detail = f" {detail}" if detail else ""
    return f"Connected to {partner} but connection died.{detail} {dup}(#4.4.2)\n"


@dataclass
class Outcome:
    """What one qmail-remote run would print, plus hints for the caller's host loop."""

    letter: str
    text: str
    rcpts: list[tuple[str, str]] = field(default_factory=list)
    #: a TLS policy failure on this host: the next address may do better
    next_host: bool = False
    #: the TLS handshake failed after STARTTLS: try this host again without it
    plain_retry: bool = False
    #: lines for the log (TLS outcome and the like)
    notes: list[str] = field(default_factory=list)
    #: a kept connection failed before the server answered for this message: try a fresh one
    stale: bool = False


def message(letter: str, text: str) -> Outcome:
    """A report for the whole message and every recipient alike."""
    return Outcome(letter, text)


def wire(outcome: Outcome) -> bytes:
    """qmail-remote's output: each recipient report, then the message report, each NUL-ended."""
    parts = [code + text.replace("\0", "?") for code, text in outcome.rcpts]
    parts.append(outcome.letter + outcome.text.replace("\0", "?"))
    return b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in parts)


_RANK = {K: 1, Z: 0, D: -1}


def per_recipient(outcome: Outcome, count: int) -> list[tuple[str, str]]:
    """One (K|Z|D, text) per recipient, as qmail-rspawn's report() combines the reports.

    A recipient's own `h`/`s` wins over the message letter; `r` takes the message
    letter. The message text follows the recipient's text when the message did
    no better than the recipient (so "does not like recipient" is followed by
    "Giving up on IP."). Recipients without a report of their own (the
    connection died first) get the message report.
    """
    result = _RANK[outcome.letter]
    out = []
    for i in range(count):
        if i >= len(outcome.rcpts):
            out.append((outcome.letter, outcome.text))
            continue
        code, text = outcome.rcpts[i]
        rank = {ACCEPTED: result, TEMPORARY: 0, PERMANENT: -1}[code]
        letter = {1: K, 0: Z, -1: D}[rank]
        if result <= rank:
            text += outcome.text
        out.append((letter, text))
    return out
