"""The edge of every program: exceptions become one line and an exit code, never a traceback."""

from __future__ import annotations

import sys
from typing import Callable


def fatal(prog: str, reason: str, code: int) -> int:
    """Print `prog: fatal: reason` on stderr and return `code`."""
    try:
        if sys.stderr is not None:
            sys.stderr.write(f"{prog}: fatal: {reason}\n")
            sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return code


def run(prog: str, body: Callable[[], int], crash_code: int = 111, quiet: bool = False) -> None:
    """Run `body()` and exit with its code; a crash exits `crash_code` with one line (or none if `quiet`)."""
    try:
        code = body()
    except KeyboardInterrupt:
        code = crash_code
    except SystemExit:
        raise
    except BaseException as e:  # the program's edge: nothing escapes as a traceback
        if not quiet:
            fatal(prog, f"internal error: {type(e).__name__}: {e}", crash_code)
        code = crash_code
    try:
        if sys.stdout is not None:  # None when the program was started with fd 1 closed
            sys.stdout.flush()
    except (OSError, ValueError):
        pass
    sys.exit(code)
