"""SMTP connections kept open for the next message to the same server (beyond qmail).

qmail-remote opens one connection per message. Under a backlog for one
destination, connecting, the greeting, EHLO, STARTTLS and QUIT are most of
the work on both ends, so a connection whose transaction ended cleanly waits
here up to IDLE seconds for another message to the same address, port, HELO
name and TLS terms, for at most MAX_USES transactions; then it gets its QUIT.
Postfix's smtp client does the same with its connection cache.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from smarthost.remote.smtp_session import Resume
from smarthost.remote.transport import Channel

#: seconds a kept connection waits for the next message (Postfix: smtp_connection_cache_time_limit 2s)
IDLE = 2.0
#: transactions one connection carries at most
MAX_USES = 100


@dataclass(eq=False)
class Kept:
    chan: Channel
    resume: Resume
    uses: int
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class SessionCache:
    def __init__(self, idle: float = IDLE, max_uses: int = MAX_USES):
        self.idle_time = idle
        self.max_uses = max_uses
        self.idle: dict[tuple, list[Kept]] = {}
        self.closed = False
        self._closing: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _here(self) -> None:
        """Connections belong to the event loop that made them: forget those of another."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            for kept in self.idle.values():
                for k in kept:
                    if k.timer:
                        k.timer.cancel()
            self.idle.clear()
            self._closing.clear()
            self._loop = loop

    def take(self, key: tuple) -> Kept | None:
        """A kept connection for `key` that still looks open, or None."""
        self._here()
        kept = self.idle.get(key)
        while kept:
            k = kept.pop()
            if k.timer:
                k.timer.cancel()
            if k.chan.usable():
                if not kept:
                    del self.idle[key]
                return k
            self._quit(k)
        self.idle.pop(key, None)
        return None

    def keep(self, key: tuple, chan: Channel, resume: Resume, uses: int) -> bool:
        """Keep `chan` (which has carried `uses` transactions); False: close it yourself."""
        if self.closed or uses >= self.max_uses:
            return False
        self._here()
        k = Kept(chan, resume, uses)
        k.timer = asyncio.get_running_loop().call_later(self.idle_time, self._expire, key, k)
        self.idle.setdefault(key, []).append(k)
        return True

    def _expire(self, key: tuple, k: Kept) -> None:
        kept = self.idle.get(key, [])
        if k in kept:
            kept.remove(k)
            if not kept:
                del self.idle[key]
        self._quit(k)

    def _quit(self, k: Kept) -> None:
        task = asyncio.get_running_loop().create_task(k.chan.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """QUIT every kept connection; keep no more."""
        self.closed = True
        for kept in self.idle.values():
            for k in kept:
                if k.timer:
                    k.timer.cancel()
                self._quit(k)
        self.idle.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def __len__(self) -> int:
        return sum(len(v) for v in self.idle.values())
