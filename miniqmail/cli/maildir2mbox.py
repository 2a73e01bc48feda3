"""maildir2mbox: move mail from a Maildir into an mbox (maildir2mbox(1), qmail's maildir2mbox.c).

    MAILDIR=$HOME/Maildir MAIL=$HOME/Mailbox MAILTMP=$HOME/.Mailbox.tmp maildir2mbox

Takes every message of $MAILDIR/new and $MAILDIR/cur, oldest first, appends
them to the mbox $MAIL through $MAILTMP (same filesystem), then removes them
from the Maildir. Exit 0 when done or when there was nothing to do (then
$MAIL is left alone); 111 with `maildir2mbox: fatal: ...` on any trouble, and
then $MAIL and the Maildir are as they were. Run one at a time.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

from miniqmail.maildirmbox import Maildir2mboxError, maildir2mbox
from miniqmail.maildirscan import ScanError
from miniqmail.progmain import fatal, run

PROG = "maildir2mbox"


def _warn(text: str) -> None:
    sys.stderr.write(f"{PROG}: warning: {text}\n")
    sys.stderr.flush()


def _stop(signum: int, frame: FrameType | None) -> None:
    # Turned into an exception so the half-built $MAILTMP is removed on the way out.
    raise KeyboardInterrupt


def main_body() -> int:
    os.umask(0o077)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    env = {}
    for name in ("MAIL", "MAILTMP", "MAILDIR"):
        value = os.environ.get(name)
        if not value:
            return fatal(PROG, f"${name} is not set", 111)
        env[name] = value
    try:
        maildir2mbox(env["MAILDIR"], env["MAIL"], env["MAILTMP"], warn=_warn)
    except (Maildir2mboxError, ScanError) as e:
        return fatal(PROG, str(e), 111)
    except KeyboardInterrupt:
        return fatal(PROG, "interrupted; $MAIL and $MAILDIR are unchanged", 111)
    return 0


def main() -> None:
    run(PROG, main_body)


if __name__ == "__main__":
    main()
