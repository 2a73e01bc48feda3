"""tcprules: compile tcpserver rules into a cdb (ucspi-tcp 0.88 tcprules(1), tcprules.c).

    tcprules rules.cdb rules.tmp < rules.txt

Reads rules on stdin, writes them to rules.tmp and renames it over rules.cdb,
so a running server sees the old rules or the new, never half. A line it
cannot parse: `tcprules: fatal: unable to parse this line: ...`, exit 100,
rules.cdb untouched. Trouble with files: exit 111. Accepts IPv6 rules as
fefe's IPv6 patch does (`::1:allow`).
"""

from __future__ import annotations

import sys

from miniqmail.progmain import fatal, run
from smarthost import tcprules
from smarthost.cdb import CdbError

PROG = "tcprules"


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e)


def compile_stdin(cdb_path: str, tmp_path: str) -> int:
    try:
        writer = tcprules.open_writer(cdb_path, tmp_path)
    except OSError as e:
        return fatal(PROG, f"unable to create {tmp_path}: {_reason(e)}", 111)
    lines = iter(sys.stdin.buffer)
    while True:
        try:
            raw = next(lines, None)
        except OSError as e:
            writer.abort()
            return fatal(PROG, f"unable to read input: {_reason(e)}", 111)
        if raw is None:
            break
        try:
            rule = tcprules.parse_line(raw)
        except tcprules.RulesSyntaxError as e:
            writer.abort()
            return fatal(PROG, str(e), 100)
        if rule is None:
            continue
        data = rule.data()
        try:
            for key in rule.keys():
                writer.add(key, data)
        except (OSError, CdbError) as e:
            writer.abort()
            return fatal(PROG, f"unable to write to {tmp_path}: {_reason(e)}", 111)
    try:
        writer.finish()
    except OSError as e:
        if getattr(e, "filename2", None):
            return fatal(PROG, f"unable to move {tmp_path} to {cdb_path}: {_reason(e)}", 111)
        return fatal(PROG, f"unable to write to {tmp_path}: {_reason(e)}", 111)
    except CdbError as e:
        return fatal(PROG, f"unable to write to {tmp_path}: {e}", 111)
    return 0


def body() -> int:
    if len(sys.argv) < 3:
        sys.stderr.write("tcprules: usage: tcprules rules.cdb rules.tmp\n")
        return 100
    return compile_stdin(sys.argv[1], sys.argv[2])


def main() -> None:
    run(PROG, body)


if __name__ == "__main__":
    main()
