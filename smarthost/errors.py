"""One exception root for the smart host, split into temporary and permanent failures."""

from __future__ import annotations


class SmarthostError(Exception):
    """Root of every error the smart host raises on purpose."""

    temporary = True
    exit_code = 111
    status = "4.3.0"

    def __init__(self, text: str, *, exit_code: int | None = None, status: str | None = None):
        super().__init__(text)
        self.text = text
        if exit_code is not None:
            self.exit_code = exit_code
        if status is not None:
            self.status = status


class TemporaryError(SmarthostError):
    """Try again later: nothing was lost, nothing was done."""


class PermanentError(SmarthostError):
    """Retrying cannot help."""

    temporary = False
    exit_code = 100
    status = "5.3.0"
