"""Where a smart host lives: SMARTHOST_ROOT (default /var/qmail) and the paths under it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

from miniqmail.control import Control

DEFAULT_ROOT = "/var/qmail"


def default_root() -> str:
    return os.environ.get("SMARTHOST_ROOT") or DEFAULT_ROOT


@dataclass(frozen=True)
class Root:
    """A smart host's root directory, like qmail's /var/qmail."""

    path: str

    @classmethod
    def from_env(cls) -> "Root":
        return cls(os.path.abspath(default_root()))

    def sub(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    @property
    def control_dir(self) -> str:
        return self.sub("control")

    @cached_property
    def control(self) -> Control:
        return Control(self.control_dir)

    @property
    def queue_dir(self) -> str:
        return self.sub("queue")

    @property
    def users_dir(self) -> str:
        return self.sub("users")

    @property
    def alias_dir(self) -> str:
        return self.sub("alias")

    @property
    def rules_dir(self) -> str:
        return self.sub("rules")

    @property
    def mode(self) -> str:
        """`user` or `system`, fixed when the root was made (control/mode, default system)."""
        return (self.control.line("mode") or "system").strip().lower()
