"""Date formats qmail writes: date822fmt.c (`21 Nov 2026 07:57:03 -0000`) and the mbox From_ line."""

from __future__ import annotations

import time

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def date822(when: float | None = None) -> str:
    """RFC 822 date as qmail writes it: UTC, no weekday, unpadded day, zone -0000."""
    t = time.gmtime(when)
    return (f"{t.tm_mday} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} -0000")


def ctime_gmt(when: float | None = None) -> str:
    """The From_ line date qmail-local writes: `Sun Jan 05 12:00:00 2025` (UTC, day zero-padded)."""
    t = time.gmtime(when)
    return (f"{_DAYS[t.tm_wday]} {_MONTHS[t.tm_mon - 1]} {t.tm_mday:02d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {t.tm_year}")
