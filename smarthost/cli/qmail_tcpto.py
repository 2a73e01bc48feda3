"""qmail-tcpto: list the hosts remote delivery skips because they timed out (qmail-tcpto(8)).

One line per address with recent timeouts, as qmail's program prints it:
`IP timed out S seconds ago; # recent timeouts: C` (IPv4 from queue/lock/tcpto,
then IPv6 from queue/lock/tcpto6).
"""

from __future__ import annotations

import os
import sys
import time

from miniqmail.progmain import fatal, run
from smarthost.remote.tcpto import TcptoFiles
from smarthost.root import Root


def show() -> int:
    lockdir = os.path.join(Root.from_env().queue_dir, "lock")
    if not os.path.isdir(lockdir):
        return fatal("qmail-tcpto", f"unable to chdir to {lockdir}: no such directory", 111)
    try:
        entries = TcptoFiles(lockdir).entries()
    except OSError as e:
        return fatal("qmail-tcpto", f"unable to read {lockdir}/tcpto: {e.strerror or e}", 111)
    now = int(time.time())
    sys.stdout.write("".join(f"{ip} timed out {max(0, now - when)} seconds ago; # recent timeouts: {count}\n"
                             for ip, count, when in entries))
    return 0


def main() -> None:
    run("qmail-tcpto", show)


if __name__ == "__main__":
    main()
