"""qmail-tcpok: forget every timeout tcpto remembers, so remote delivery tries all hosts again (qmail-tcpok(8))."""

from __future__ import annotations

import os

from miniqmail.progmain import fatal, run
from smarthost.remote.tcpto import TcptoFiles
from smarthost.root import Root


def clear() -> int:
    lockdir = os.path.join(Root.from_env().queue_dir, "lock")
    if not os.path.isdir(lockdir):
        return fatal("qmail-tcpok", f"unable to chdir to {lockdir}: no such directory", 111)
    try:
        TcptoFiles(lockdir).clear()
    except OSError as e:
        return fatal("qmail-tcpok", f"unable to clear {lockdir}/tcpto: {e.strerror or e}", 111)
    return 0


def main() -> None:
    run("qmail-tcpok", clear)


if __name__ == "__main__":
    main()
