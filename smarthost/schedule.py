"""qmail-send's retry schedule: quadratic from the message's birth (nextretry(), THOUGHTS).

next = birth + (floor(sqrt(now - birth)) + skip)^2, computed when a pass starts;
skip is 10 for local deliveries and 20 for remote ones.
"""

from __future__ import annotations

import math

SKIP = {"local": 10, "remote": 20}
LIFETIME_DEFAULT = 604800


def next_retry(birth: float, now: float, channel: str) -> float:
    """When the next pass of `channel` is due, for a pass starting at `now`."""
    age = max(0.0, now - birth)
    n = math.isqrt(int(age)) + SKIP[channel]
    return birth + n * n


def expired(birth: float, now: float, lifetime: int) -> bool:
    """A pass starting now is the last one: deferrals become failures."""
    return now > birth + lifetime
