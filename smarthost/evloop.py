"""The event loop the daemon's processes run: uvloop's where it is installed, else asyncio's own.

The daemon's CPU goes to many short QMQP sessions and deliveries; uvloop's
loop and socket calls (libuv, in C) spend less of it per message than asyncio's
pure-Python loop (see tests/bench/bench_qmqp.py). Both run the same code: set
SMARTHOST_EVENT_LOOP=asyncio to choose asyncio's loop anyway.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Coroutine

ENV = "SMARTHOST_EVENT_LOOP"


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run(main) on the loop chosen above."""
    if os.environ.get(ENV, "") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main)
    return asyncio.run(main)
