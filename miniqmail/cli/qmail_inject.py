"""qmail-inject: preprocess a message and hand it on (qmail-inject(8)).

    qmail-inject [ -aAhHnN ] [ -f sender ] [ arg ... ]

Options are parsed like DJB's getopt (sgetopt.c): clusters (`-an`),
attached or separate arguments (`-fme`, `-f me`), `--` ends them, and an
unknown option is `qmail-inject: illegal option -- x`, exit 100.
"""

from __future__ import annotations

import os
import sys
from typing import Iterator

import miniqmail
from miniqmail.inject import Options, environment, inject
from miniqmail.progmain import run

PROG = "qmail-inject"


class GetoptError(Exception):
    """An unknown option, or one missing its argument; the text is getopt's."""


class Getopt:
    """DJB-style getopt over `args` (without the program name).

    In `spec` a letter followed by `:` takes an argument; followed by `;` it
    takes whatever else is in its cluster, possibly nothing (sendmail's
    `-E`, `-J`). Iterating yields (letter, argument); `rest` holds the
    operands once iteration is over. Errors are raised when reached, so
    options before them have already been acted on, as in C.
    """

    def __init__(self, args: list[str], spec: str):
        self.args = list(args)
        self.spec = spec
        self.rest: list[str] = []

    def _kind(self, letter: str) -> str | None:
        at = self.spec.find(letter)
        if at < 0 or letter in ":;":
            return None
        return self.spec[at + 1:at + 2] if self.spec[at + 1:at + 2] in (":", ";") else ""

    def __iter__(self) -> Iterator[tuple[str, str]]:
        i = 0
        while i < len(self.args):
            arg = self.args[i]
            if arg == "--":
                i += 1
                break
            if not arg.startswith("-") or arg == "-":
                break
            i += 1
            pos = 1
            while pos < len(arg):
                letter = arg[pos]
                pos += 1
                kind = self._kind(letter)
                if kind is None:
                    raise GetoptError(f"illegal option -- {letter}")
                if kind == ":":
                    if pos < len(arg):
                        value = arg[pos:]
                    elif i < len(self.args):
                        value = self.args[i]
                        i += 1
                    else:
                        raise GetoptError(f"option requires an argument -- {letter}")
                    yield letter, value
                    break
                if kind == ";":
                    yield letter, arg[pos:]
                    break
                yield letter, ""
        self.rest = self.args[i:]


def latin(arg: str) -> str:
    """A command-line argument as the injector's one-character-per-byte text."""
    return os.fsencode(arg).decode("latin-1")


def usage_error(prog: str, text: str) -> int:
    try:
        sys.stderr.write(f"{prog}: {text}\n")
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass  # no stderr at all: the exit code still says it
    return 100


def qmail_inject(argv: list[str]) -> int:
    recipients, queue, sender = "A", True, None
    getopt = Getopt(argv, "aAhHnNf:")
    try:
        for opt, value in getopt:
            if opt in "aAhH":
                recipients = opt
            elif opt in "nN":
                queue = opt == "N"
            else:
                sender = latin(value)
    except GetoptError as e:
        return usage_error(PROG, str(e))
    opts = Options(recipients, queue, sender, tuple(latin(a) for a in getopt.rest))
    stdin = sys.stdin.buffer if sys.stdin is not None else None
    stdout = sys.stdout.buffer if sys.stdout is not None else None
    return inject(stdin, stdout, opts, environment(), miniqmail.root())


def main() -> None:
    run(PROG, lambda: qmail_inject(sys.argv[1:]))


if __name__ == "__main__":
    main()
