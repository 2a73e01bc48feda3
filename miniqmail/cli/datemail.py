"""datemail: sendmail with a local-time Date: field (qmail's datemail.sh, `predate sendmail "$@"`).

qmail runs predate, which runs sendmail; here both are done in this process:
predate's Date: line is put before standard input and the sendmail code
reads that. qmail-inject keeps an existing Date:, so the message carries the
local-zone date (qmail FAQ 6.1). Arguments and exit codes are sendmail's.
"""

from __future__ import annotations

import io
import sys

from miniqmail.cli.predate import date_line
from miniqmail.cli.sendmail import main_with
from miniqmail.headers import Message


def main() -> None:
    stdin = sys.stdin.buffer if sys.stdin is not None else None
    # fix_eol=False: predate copies its input untouched; qmail-inject adds any missing newline itself.
    main_with(io.BufferedReader(Message(date_line(), stdin, fix_eol=False)))


if __name__ == "__main__":
    main()
