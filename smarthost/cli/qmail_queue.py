"""qmail-queue: queue one message (qmail-queue(8)).

Message on fd 0, envelope on fd 1 (read after the message, as qmail does, so a
caller that writes the message first never deadlocks). Prints nothing; the
exit code is the answer.
"""

from __future__ import annotations

import os
import signal

from miniqmail import envelope
from miniqmail.exitcodes import QQ
from smarthost.errors import SmarthostError
from smarthost.queue import Queue, invoked_by_uid, received_line
from smarthost.root import Root

#: qmail-queue kills itself after a day, well before cleanup's 36 hours.
DEATH = 86400


def invoked() -> str:
    """qmail-queue chooses its words by real uid; QMAILQUEUE_INVOKED lets a server say it."""
    return os.environ.get("QMAILQUEUE_INVOKED") or invoked_by_uid()


def queue_one() -> int:
    root = Root.from_env()
    q = Queue(root.queue_dir)
    try:
        q.check()
    except SmarthostError as e:
        return e.exit_code
    try:
        env_in = open(1, "rb", buffering=65536, closefd=False)
        os.fstat(1)
    except OSError:
        return QQ.READ
    draft = q.draft()
    try:
        draft.write(received_line(invoked(), draft.qp))
        with open(0, "rb", buffering=0, closefd=False) as msg:
            draft.write_from(msg)
        try:
            env = envelope.read(env_in)
        except envelope.EnvelopeError as e:
            return e.code
        except OSError:
            return QQ.READ
        draft.commit(env.sender, env.recipients, uid=os.getuid())
        return QQ.OK
    except SmarthostError as e:
        return e.exit_code
    except MemoryError:
        return QQ.NOMEM
    finally:
        draft.close()


def main() -> None:
    signal.signal(signal.SIGALRM, lambda *_: os._exit(QQ.TIMEOUT))
    signal.alarm(DEATH)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        code = queue_one()
    except SmarthostError as e:
        code = e.exit_code
    except BaseException:
        code = QQ.BUG
    os._exit(int(code))


if __name__ == "__main__":
    main()
