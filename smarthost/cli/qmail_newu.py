"""qmail-newu(8): compile ROOT/users/assign into ROOT/users/cdb.

Like qmail-newu.c: the cdb is written to users/cdb.tmp, fsynced and renamed
over users/cdb, so qmail-lspawn sees the old table or the new one, never half
of one. Any trouble is one line `qmail-newu: fatal: ...` and exit 111, and the
old users/cdb stays as it was.
"""

from __future__ import annotations

import os
import sys

from miniqmail.progmain import fatal, run
from smarthost.cdb import CdbError
from smarthost.root import Root
from smarthost.users import AssignError, compile_assign

PROG = "qmail-newu"


def newu(root: Root) -> int:
    assign = os.path.join(root.users_dir, "assign")
    target = os.path.join(root.users_dir, "cdb")
    os.umask(0o033)  # qmail-newu's: users/cdb readable by every delivery, writable by none
    try:
        compile_assign(assign, target)
    except AssignError as e:
        return fatal(PROG, f"bad format in users/assign: {e}", 111)
    except FileNotFoundError as e:
        if e.filename == assign:
            return fatal(PROG, "unable to open users/assign: file does not exist", 111)
        return fatal(PROG, f"unable to write users/cdb.tmp: {e.strerror}", 111)
    except CdbError as e:
        return fatal(PROG, f"unable to write users/cdb.tmp: {e}", 111)
    except OSError as e:
        what = "read users/assign" if e.filename == assign else "write users/cdb"
        return fatal(PROG, f"unable to {what}: {e.strerror or e}", 111)
    return 0


def main(argv: list[str] | None = None) -> None:
    del argv  # qmail-newu takes no arguments, and ignores any
    run(PROG, lambda: newu(Root.from_env()))


if __name__ == "__main__":
    main(sys.argv[1:])
