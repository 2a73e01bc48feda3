"""Group commit for a QMQP process: a few disk threads, each committing together
every message that finished while it was busy.

A thread per commit makes each session's fsyncs wait alone, and the threads
then contend with the loop (and each other) for the interpreter at every
system call. A thread that takes whatever has piled up in the meantime writes
the envelopes of all of them, starts every message's writeback, then fsyncs
(queue.commit_group): the messages share its wake-ups, and the write of todo/
(or the journal commit) that makes one link durable makes the others made
before it durable too. Two threads rather than one, so that a group gathers
and starts while the last one waits for the disk. Within a group the fsyncs (two
per message, see smarthost.queue) run side by side, in one Linux AIO submission
(or, where the kernel refuses it or a directory needs its own fsync, in a small
pool): the disk's cache flush, the costly part of each, then serves several at
once. The loop hands the sessions that finished during one of its turns over
together, at the end of the turn: a hand-over wakes a thread, which then wants
the interpreter the loop holds. Each message keeps the order of writes and fsyncs that a lone
commit has, and each client is answered only once its own message is durable.
"""

from __future__ import annotations

import asyncio
import functools
import queue as _queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from smarthost.qmqp_session import Event, QueueSink, Request, Refused
from smarthost.queue import QueueError, commit_group, side_by_side

#: disk threads per event loop: while one waits for its group's fsyncs, the next
#: group gathers and starts (one alone halves the rate where an fsync is slow)
THREADS = 2
#: threads that fsync the drafts of one group side by side (queue.commit_group)
FSYNC_THREADS = 8

_Job = tuple[QueueSink, list[bytes], Event, asyncio.Future]


def _finish_all(jobs: list[_Job], each: Callable = map) -> list[str | BaseException]:
    """Write each session's last data and stage its envelope, commit the staged
    drafts as a group (with `each`, see queue.commit_group), and return every
    session's answer text (or what it raised: a bug in one session's handling is
    that session's alone)."""
    out: list[str | BaseException | None] = []
    staged: list[int] = []
    for i, (sink, chunks, event, _) in enumerate(jobs):
        try:
            sink.write_all(chunks)
            assert isinstance(event, (Request, Refused))
            text = sink.stage(event)
        except Exception as e:
            sink.discard()
            out.append(e)
            continue
        out.append(text)
        if text is None:
            staged.append(i)
    drafts = [jobs[i][0].draft for i in staged]
    for i, result in zip(staged, commit_group(drafts, each)):  # type: ignore[arg-type]
        out[i] = jobs[i][0].settle(result if isinstance(result, QueueError) else None)
    return out  # type: ignore[return-value]


def _deliver(futures: list[asyncio.Future], results: list[str | BaseException] | None,
             error: BaseException | None) -> None:
    for i, fut in enumerate(futures):
        if fut.done():
            continue
        result = results[i] if results is not None else error or RuntimeError("commit failed")
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)


class Committer:
    """The disk threads of one event loop; started at the first commit, stopped by close()."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int = THREADS):
        self._loop = loop
        self._jobs: _queue.SimpleQueue[list[_Job] | None] = _queue.SimpleQueue()
        self._pending: list[_Job] = []  # finished during this turn of the loop
        self._fsyncs = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="qmqp-fsync")
        self._side_by_side = functools.partial(side_by_side, pool=self._fsyncs)  # a group's fsyncs
        self._running = threads
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name="qmqp-commit", daemon=True)
                         for _ in range(threads)]
        for t in self._threads:
            t.start()

    def finish(self, sink: QueueSink, chunks: list[bytes], event: Event) -> asyncio.Future:
        """A future for the session's answer text, once its message is durable (or refused)."""
        fut = self._loop.create_future()
        if not self._pending:
            self._loop.call_soon(self._hand_over)
        self._pending.append((sink, chunks, event, fut))
        return fut

    def _hand_over(self) -> None:
        """The sessions that finished during the loop's last turn, to the threads at once."""
        if self._pending:
            jobs, self._pending = self._pending, []
            self._jobs.put(jobs)

    def close(self) -> None:
        """Let the threads finish what they have, then end."""
        self._hand_over()
        for _ in self._threads:
            self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            jobs: list[_Job] = []
            stop = False
            while True:
                if job is None:
                    stop = True
                else:
                    jobs.extend(job)
                try:
                    job = self._jobs.get_nowait()
                except _queue.Empty:
                    break
            if jobs:
                futures = [j[3] for j in jobs]
                try:
                    results: list[str | BaseException] | None = _finish_all(jobs, self._side_by_side)
                    error = None
                except BaseException as e:  # never lose the thread: every session hears
                    results, error = None, e
                try:
                    self._loop.call_soon_threadsafe(_deliver, futures, results, error)
                except RuntimeError:
                    pass  # the loop is closed: nobody is waiting any more
            if stop:
                with self._lock:
                    self._running -= 1
                    last = not self._running
                if last:
                    self._fsyncs.shutdown(wait=False)  # the others are done with it
                return
