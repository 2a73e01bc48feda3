"""The scheduler's end of the pipes to the local delivery spawner (smarthost.lspawn).

Kept apart from smarthost.lspawn on purpose: this side needs asyncio, and the
spawner must not import it (its at-fork hooks would run in every delivery child).
"""

from __future__ import annotations

import asyncio
import sys

from smarthost.root import Root


class LocalSpawner:
    """The scheduler's end of the pipes to smarthost.lspawn.

    A spawner that dies (killed, out of memory) costs the deliveries it had
    under way, which are deferred; the next delivery starts a new one.
    """

    def __init__(self, root: Root):
        self.root = root
        self.proc: asyncio.subprocess.Process | None = None
        self.waiting: dict[int, asyncio.Future] = {}
        self._ids = 0
        self.alive = False
        self._restart = asyncio.Lock()   # one new spawner, however many deliveries find it dead

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "smarthost.lspawn", self.root.path,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        hello = await self.proc.stdout.readexactly(1)
        if hello != b"+":
            raise RuntimeError("local delivery spawner did not start")
        self.alive = True
        self._reader = asyncio.get_running_loop().create_task(self._read(self.proc))  # held: tasks are weak

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout
        while True:
            try:
                did = await proc.stdout.readuntil(b"\0")
                report = await proc.stdout.readuntil(b"\0")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                break
            fut = self.waiting.pop(int(did[:-1]), None)
            if fut and not fut.done():
                fut.set_result(report[:-1].decode("utf-8", "surrogateescape"))
        self.alive = False
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_result("ZLocal delivery spawner died. (#4.3.0)")
        self.waiting.clear()
        try:
            await proc.wait()
        except Exception:
            pass

    async def deliver(self, messid: int, sender: str, recipient: str) -> tuple[str, str]:
        if not self.alive:
            async with self._restart:
                if not self.alive:
                    await self.start()  # trouble raises: run_delivery() defers the delivery
        assert self.proc and self.proc.stdin
        self._ids += 1
        fut = asyncio.get_running_loop().create_future()
        self.waiting[self._ids] = fut
        self.proc.stdin.write(b"%d\0%d\0%s\0%s\0" % (
            self._ids, messid, sender.encode("utf-8", "surrogateescape"),
            recipient.encode("utf-8", "surrogateescape")))
        report = await fut
        return report[:1] or "Z", report[1:]

    async def stop(self) -> None:
        if self.proc and self.proc.stdin:
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except asyncio.TimeoutError:
                self.proc.kill()
