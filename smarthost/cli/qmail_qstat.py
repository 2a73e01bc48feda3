"""qmail-qstat: how many messages are queued, and how many not yet preprocessed."""

from __future__ import annotations

import os
import sys

from miniqmail.progmain import fatal, run
from smarthost.queue import Queue
from smarthost.root import Root


def qstat() -> int:
    q = Queue(Root.from_env().queue_dir)
    try:
        q.check()
        mess = len(q.mess_ids())
        # A todo/N whose info/N exists is preprocessed already; todo/N only waits for an fsync.
        todo = sum(1 for n in q.todo_ids() if not os.path.exists(q.info(n)))
    except OSError as e:
        return fatal("qmail-qstat", f"unable to read the queue: {e}", 111)
    except Exception as e:
        return fatal("qmail-qstat", str(e), 111)
    sys.stdout.write(f"messages in queue: {mess}\n"
                     f"messages in queue but not yet preprocessed: {todo}\n")
    return 0


def main() -> None:
    run("qmail-qstat", qstat)


if __name__ == "__main__":
    main()
