"""The error a mailbox writer (Maildir, mbox) raises: an OSError that reads as one plain sentence."""

from __future__ import annotations


class MailboxError(OSError):
    """Writing into a mailbox failed; nothing was left behind, try again later."""

    def __init__(self, message: str, path: str, err: OSError | None = None):
        super().__init__(message)
        self.message = message
        self.filename = path
        if err is not None:
            self.errno = err.errno
            self.strerror = err.strerror

    def __str__(self) -> str:
        return self.message  # OSError's own format would put "[Errno N]" first
