"""mini-qmail: the queueless client side (qmail-qmqpc, qmail-inject, sendmail and friends)."""

import os

DEFAULT_ROOT = "/var/mini-qmail"


def root() -> str:
    """The client's root directory: $MINIQMAIL_ROOT, else /var/mini-qmail."""
    return os.environ.get("MINIQMAIL_ROOT") or DEFAULT_ROOT
