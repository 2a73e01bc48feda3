"""qmail's date formats, and date822's one-second cache."""

import time

from hypothesis import given, strategies as st

from miniqmail.datefmt import date822


def uncached(when: float) -> str:
    months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    t = time.gmtime(when)
    return f"{t.tm_mday} {months[t.tm_mon - 1]} {t.tm_year} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} -0000"


@given(st.floats(min_value=-86400 * 365, max_value=4e9, allow_nan=False), st.floats(min_value=0, max_value=2))
def test_date822_is_gmtime_of_the_second_whatever_came_before(when, step):
    assert date822(when) == uncached(when)
    assert date822(when + step) == uncached(when + step)  # the next call may hit the cache
    assert date822(when) == uncached(when)


def test_date822_examples():
    assert date822(0) == "1 Jan 1970 00:00:00 -0000"
    assert date822(1795269739.9) == "21 Nov 2026 14:02:19 -0000"
    assert date822(-0.5) == "31 Dec 1969 23:59:59 -0000"
    assert date822() == uncached(time.time()) or date822() == uncached(time.time())
