"""Date formats qmail writes: date822fmt.c (`21 Nov 2026 07:57:03 -0000`) and the mbox From_ line."""

from __future__ import annotations

import time

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


_last822: tuple[int, str] = (-1, "")


def date822(when: float | None = None) -> str:
    """RFC 822 date as qmail writes it: UTC, no weekday, unpadded day, zone -0000."""
    global _last822
    sec = int(time.time() if when is None else when // 1)  # gmtime() floors too
    if sec == _last822[0]:
        return _last822[1]  # a server writes many a second
    t = time.gmtime(sec)
    text = (f"{t.tm_mday} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} -0000")
    _last822 = (sec, text)
    return text


def ctime_gmt(when: float | None = None) -> str:
    """The From_ line date qmail-local writes: `Sun Jan 05 12:00:00 2025` (UTC, day zero-padded)."""
    t = time.gmtime(when)
    return (f"{_DAYS[t.tm_wday]} {_MONTHS[t.tm_mon - 1]} {t.tm_mday:02d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {t.tm_year}")


def date822_local(when: float | None = None) -> str:
    """predate's date: local time with its numeric zone (`+0100`; UTC is `+0000`, not `-0000`)."""
    t = time.localtime(time.time() if when is None else when)
    offset = t.tm_gmtoff or 0
    minutes = (abs(offset) + 30) // 60  # rounded, as predate.c does
    sign = "-" if offset < 0 else "+"
    return (f"{t.tm_mday} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} "
            f"{sign}{minutes // 60:02d}{minutes % 60:02d}")


def date_gmt(when: float) -> str:
    """qmail-qread's date: `21 Nov 2026 07:57:03 GMT`."""
    return date822(when)[: -len("-0000")] + "GMT"
