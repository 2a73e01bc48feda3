"""control/qmqpservers: the QMQP servers to try, in order (qmail-qmqpc(8), qmail-control(5)).

qmail-qmqpc.c takes lines starting with a dotted-quad IPv4 address and dials
port 628, silently skipping every other line. Those lines mean the same here.
As an extension a line may also be

    host.example:2628    a.b.c.d:2628    [2001:db8::1]    [2001:db8::1]:2628
    host.example         2001:db8::1

(port 628 where none is given). The first word of a line is the entry;
anything after blanks is ignored, as qmail ignores text after the address.
Lines that are none of these are skipped without a word: this program
prints nothing, and the exit code says when no line was usable.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from miniqmail.control import Control
from miniqmail.qmqp import PORT

_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")


@dataclass(frozen=True)
class Server:
    """One entry: where to connect, and whether `host` is an address that needs no lookup."""

    host: str
    port: int = PORT
    literal: bool = True

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _ipv4(text: str) -> bool:
    # inet_pton takes exactly four decimal octets, no more lenient forms.
    try:
        socket.inet_pton(socket.AF_INET, text)
    except OSError:
        return False
    return True


def _ipv6(text: str) -> bool:
    addr, _, scope = text.partition("%")
    if "%" in text and not scope:
        return False
    try:
        socket.inet_pton(socket.AF_INET6, addr)
    except OSError:
        return False
    return True


def _port(text: str) -> int | None:
    if not text.isascii() or not text.isdigit() or len(text) > 5 or text.startswith("0"):
        return None
    value = int(text)
    return value if 1 <= value <= 65535 else None


def _hostname(text: str) -> bool:
    if not text or len(text) > 253 or not set(text) <= _HOST_CHARS:
        return False
    labels = text.rstrip(".").split(".")
    if all(label.isdigit() for label in labels):
        return False  # looks like a broken IPv4 address, not a name
    return all(0 < len(label) <= 63 and not label.startswith("-") and not label.endswith("-")
                for label in labels)


def parse_line(line: str) -> Server | None:
    """The server one line names, or None for a line qmail-qmqpc would skip."""
    if not line or line[0] in " \t":
        return None  # qmail strips trailing blanks only; a leading one spoils the address
    entry = line.split(None, 1)[0]
    if entry.startswith("["):
        inside, sep, rest = entry[1:].partition("]")
        if not sep or not _ipv6(inside):
            return None
        if not rest:
            return Server(inside)
        port = _port(rest[1:]) if rest.startswith(":") else None
        return Server(inside, port) if port else None
    if entry.count(":") > 1:
        return Server(entry) if _ipv6(entry) else None
    host, sep, port_text = entry.partition(":")
    port = _port(port_text) if sep else PORT
    if port is None:
        return None
    if _ipv4(host):
        return Server(host, port)
    if _hostname(host):
        return Server(host, port, literal=False)
    return None


def parse(lines: list[str]) -> list[Server]:
    """The usable entries of `lines`, in order."""
    servers = []
    for line in lines:
        server = parse_line(line)
        if server is not None:
            servers.append(server)
    return servers


def read(control: Control) -> list[Server] | None:
    """The servers in control/qmqpservers; None if the file is missing.

    An unreadable file raises control.ControlError. Blank and '#' lines are
    already gone (control.Control.lines).
    """
    lines = control.lines("qmqpservers")
    return None if lines is None else parse(lines)
