"""Failure notices in QSBMF (qmail-send.c injectbounce(), cr.yp.to/proto/qsbmf.txt).

Pure: decides who gets a bounce and composes its head; the caller streams
`Return-Path: <sender>` and the whole queued message after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from miniqmail.datefmt import date822

DOUBLE_BOUNCE_SENDER = "#@[]"
VERP_SUFFIX = "-@[]"


@dataclass(frozen=True)
class BounceConfig:
    bouncefrom: str = "MAILER-DAEMON"
    bouncehost: str = "bouncehost"
    doublebounceto: str = "postmaster"
    doublebouncehost: str = "doublebouncehost"


@dataclass(frozen=True)
class BouncePlan:
    """Where a bounce goes: `None` from decide() means drop it (a triple bounce)."""

    sender: str
    recipient: str
    double: bool


def decide(original_sender: str, cfg: BounceConfig) -> BouncePlan | None:
    if original_sender == DOUBLE_BOUNCE_SENDER:
        return None
    if original_sender == "":
        return BouncePlan(DOUBLE_BOUNCE_SENDER, f"{cfg.doublebounceto}@{cfg.doublebouncehost}", True)
    recipient = original_sender
    if recipient.endswith(VERP_SUFFIX):
        recipient = recipient[: -len(VERP_SUFFIX)]
    return BouncePlan("", recipient, False)


def compose_head(plan: BouncePlan, original_sender: str, records: bytes, cfg: BounceConfig,
                 now: float | None = None) -> bytes:
    """Header, intro paragraph, the recipient paragraphs and the break paragraph."""
    if plan.double:
        intro = ("I tried to return a failure notice to the sender of a message,\n"
                 "but the notice itself could not be delivered.\n")
        below = "--- Below this line is the original bounce.\n"
    else:
        intro = ("I could not deliver your message to the addresses listed below.\n"
                 "This is a permanent error; I have stopped trying.\n")
        below = "--- Below this line is a copy of the message.\n"
    head = (f"Date: {date822(now)}\n"
            f"From: {cfg.bouncefrom}@{cfg.bouncehost}\n"
            f"To: {plan.recipient}\n"
            "Subject: failure notice\n"
            "\n"
            f"Hi. This is the qmail-send program at {cfg.bouncehost}.\n"
            f"{intro}\n")
    return (head.encode("utf-8", "surrogateescape") + records
            + below.encode() + b"\n"
            + f"Return-Path: <{original_sender}>\n".encode("utf-8", "surrogateescape"))
