"""qmail-remote: send one message to the recipients at one host, as qmail-remote(8) does.

    qmail-remote host sender recipient...

The message comes on fd 0. The answer goes to fd 1 in qmail-remote's format:
per recipient `r` (accepted), `h` (permanent failure) or `s` (temporary) and a
text, then `K`, `Z` or `D` and a text for the message, each ended by NUL; the
exit code is 0 whatever happened. Control files come from $SMARTHOST_ROOT/control.
Nothing is written to fd 2, which qmail-rspawn joins to fd 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
import tempfile
from typing import IO

from miniqmail.control import ControlError
from miniqmail.progmain import run
from smarthost.remote import report
from smarthost.remote.config import RemoteConfig
from smarthost.remote.deliver import Environment, MessageSource, deliver_message
from smarthost.remote.mx import DnsLookup
from smarthost.remote.report import Outcome
from smarthost.remote.tcpto import TcptoFiles
from smarthost.root import Root


def _message() -> tuple[MessageSource, IO[bytes] | None]:
    """fd 0 if it is a file; else a private copy, since QMTP needs the size first."""
    if stat.S_ISREG(os.fstat(0).st_mode):
        return MessageSource(fd=0), None
    spool = tempfile.TemporaryFile()
    while True:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        spool.write(chunk)
    spool.flush()
    return MessageSource(fd=spool.fileno()), spool


def remote(argv: list[str]) -> Outcome:
    if len(argv) < 3:
        return report.message(report.D, report.USAGE)
    host, sender, recipients = argv[0], argv[1], tuple(argv[2:])
    root = Root.from_env()
    try:
        cfg = RemoteConfig.from_control(root.control)
    except ControlError:
        return report.message(report.Z, report.TEMP_CONTROL)
    try:
        source, spool = _message()
    except OSError:
        return report.message(report.Z, report.TEMP_READ)
    env = Environment(cfg, DnsLookup(cfg.resolvers, cfg.timeoutdns),
                      TcptoFiles(os.path.join(root.queue_dir, "lock")), log=lambda line: None)
    with spool or contextlib.nullcontext():
        return asyncio.run(deliver_message(env, host, sender, recipients, source))


def main() -> None:
    def body() -> int:
        out = report.wire(remote(sys.argv[1:]))
        try:
            sys.stdout.buffer.write(out)
            sys.stdout.flush()
        except (OSError, AttributeError):  # fd 1 closed: nobody to tell
            pass
        return 0

    run("qmail-remote", body, crash_code=111, quiet=True)


if __name__ == "__main__":
    main()
