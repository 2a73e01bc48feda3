"""Local or remote: qmail-send's rewrite() over locals, virtualdomains and percenthack.

Pure policy: a Routing snapshot is built from control files once (and again on
SIGHUP) and answers `route(address) -> (channel, address)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from miniqmail.control import Control

LOCAL = "local"
REMOTE = "remote"


@dataclass(frozen=True)
class Routing:
    envnoathost: str
    locals: frozenset[str] = frozenset()
    percenthack: frozenset[str] = frozenset()
    #: virtualdomains keys (lowercased) in file order, with their prepend.
    virtualdomains: tuple[tuple[str, str], ...] = ()
    _vd: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for key, prepend in self.virtualdomains:
            self._vd.setdefault(key, prepend)  # first line wins

    @classmethod
    def from_control(cls, control: Control) -> "Routing":
        me = control.line("me")
        envnoathost = control.line("envnoathost") or me or "envnoathost"
        locals_ = control.lines("locals")
        if locals_ is None:
            locals_ = [me] if me else []
        vds = []
        for line in control.lines("virtualdomains", []) or []:
            key, sep, prepend = line.partition(":")
            if sep:
                vds.append((key.lower(), prepend))
        return cls(envnoathost=envnoathost,
                   locals=frozenset(d.lower() for d in locals_),
                   percenthack=frozenset(d.lower() for d in control.lines("percenthack", []) or []),
                   virtualdomains=tuple(vds))

    def _virtual(self, addr: str, domain: str) -> str | None:
        """The prepend for `addr`, None if no key matches ('' is an exception)."""
        for key in (addr.lower(), domain):
            if key in self._vd:
                return self._vd[key]
        # .suffix keys, longest first: walk the domain's dots from the left.
        i = domain.find(".")
        while i != -1:
            if domain[i:] in self._vd:
                return self._vd[domain[i:]]
            i = domain.find(".", i + 1)
        return self._vd.get("")

    def route(self, addr: str) -> tuple[str, str]:
        """(LOCAL or REMOTE, rewritten address) for one envelope recipient."""
        if "@" not in addr:
            addr = f"{addr}@{self.envnoathost}"
        while True:
            local, _, domain = addr.rpartition("@")
            if domain.lower() not in self.percenthack or "%" not in local:
                break
            user, _, newdomain = local.rpartition("%")
            addr = f"{user}@{newdomain}"
        domain = domain.lower()
        if domain in self.locals:
            return LOCAL, addr
        prepend = self._virtual(addr, domain)
        if prepend:
            return LOCAL, f"{prepend}-{addr}"
        return REMOTE, addr

    def unprepend(self, addr: str) -> str:
        """The address a bounce names: a virtualdomain prepend stripped again."""
        local, _, domain = addr.rpartition("@")
        d = domain.lower()
        keys = [d] + [d[i:] for i in range(len(d)) if d[i] == "."] + [""]
        for key in keys:
            prepend = self._vd.get(key)
            if prepend and local.startswith(prepend + "-"):
                return local[len(prepend) + 1:] + "@" + domain
        return addr
