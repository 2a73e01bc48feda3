"""qmail-queue(8)'s exit codes, and qmail.c's texts for them.

Every program on the qmail-queue interface (qmail-queue, qmail-qmqpc) exits
with one of these; callers (qmail-inject, the servers) turn a code into a
`D...` (permanent) or `Z...` (temporary) report with an enhanced status code.
"""

from __future__ import annotations

from enum import IntEnum


class QQ(IntEnum):
    OK = 0
    ADDRESS_TOO_LONG = 11
    PERM_REFUSED = 31
    NOMEM = 51
    TIMEOUT = 52
    WRITE = 53
    READ = 54
    CONFIG = 55
    NETWORK = 56
    HOME = 61
    QUEUE = 62
    PID = 63
    MESS = 64
    INTD = 65
    TODO = 66
    TEMP_REFUSED = 71
    CONNECT_TIMEOUT = 72
    CONNECT_REFUSED = 73
    COMM_FAILED = 74
    BUG = 81
    CUSTOM = 82
    ENVELOPE = 91


def is_permanent(code: int) -> bool:
    """qmail-queue(8): 11 to 40 are permanent, every other non-zero is temporary."""
    return 11 <= code <= 40


_TEXT = {
    11: "Denvelope address too long for qq (#5.1.3)",
    31: "Dmail server permanently rejected message (#5.3.0)",
    51: "Zqq out of memory (#4.3.0)",
    52: "Zqq timeout (#4.3.0)",
    53: "Zqq write error or disk full (#4.3.0)",
    54: "Zqq read error (#4.3.0)",
    55: "Zqq unable to read configuration (#4.3.0)",
    56: "Zqq trouble making network connection (#4.3.0)",
    61: "Zqq trouble in home directory (#4.3.0)",
    62: "Zqq trouble creating files in queue (#4.3.0)",
    63: "Zqq trouble creating files in queue (#4.3.0)",
    64: "Zqq trouble creating files in queue (#4.3.0)",
    65: "Zqq trouble creating files in queue (#4.3.0)",
    66: "Zqq trouble creating files in queue (#4.3.0)",
    71: "Zmail server temporarily rejected message (#4.3.0)",
    72: "Zconnection to mail server timed out (#4.4.1)",
    73: "Zconnection to mail server rejected (#4.4.1)",
    74: "Zcommunication with mail server failed (#4.4.2)",
    81: "Zqq internal bug (#4.3.0)",
    91: "Zqq internal bug (#4.3.0)",
    120: "Zunable to exec qq (#4.3.0)",
}


def report(code: int) -> str:
    """The `D...`/`Z...` text qmail.c gives a caller for a qmail-queue exit code."""
    if code in _TEXT:
        return _TEXT[code]
    if code < 0:
        return "Zqq crashed (#4.3.0)"
    if is_permanent(code):
        return "Dqq permanent problem (#5.3.0)"
    return "Zqq temporary problem (#4.3.0)"
