"""What qmail-showctl(8) says about a mini-qmail root (qmail's qmail-showctl.c, qmail-control(5)).

The same shape as qmail's: a line about the home directory, then, for each
control file the client reads, in alphabetical order, a blank line and
`name: value-as-a-sentence` or `name: (Default.) default-as-a-sentence`;
list files put one sentence per entry on lines of their own. Every other
file of control/ follows: a file a qmail server reads is named as such, any
other gets `I have no idea what this file does.` Bytes outside printable
ASCII are shown as `?`.

The client's files are the ones qmail-inject and qmail-qmqpc read (defaults
per qmail-control(5): the host names fall back to control/me, then to a
literal), plus this project's control/timeoutconnect and timeoutremote.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from miniqmail import qmqpservers
from miniqmail.control import Control, ControlError
from miniqmail.handoff import TIMEOUT_CONNECT, TIMEOUT_REMOTE
from miniqmail.qmqp import PORT

_PRINTABLE = frozenset(range(32, 127))

#: files of a qmail server (qmail-control(5) and friends) that mean nothing on a client.
SERVER_FILES = frozenset({
    "badmailfrom", "bouncefrom", "bouncehost", "bouncemaxbytes", "concurrencyincoming",
    "concurrencylocal", "concurrencyqmqp", "concurrencyremote", "databytes", "defaultdelivery",
    "doublebouncehost", "doublebounceto", "envnoathost", "helohost", "localiphost", "locals",
    "mode", "morercpthosts", "morercpthosts.cdb", "percenthack", "qmtproutes", "queuelifetime",
    "rcpthosts", "smtpgreeting", "smtproutes", "timeoutqmqpd", "timeoutsmtpd", "virtualdomains",
})


def printable(text: str) -> str:
    """`text` with every byte outside printable ASCII shown as `?`, as qmail-showctl does."""
    raw = text.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if b in _PRINTABLE else "?" for b in raw)


@dataclass(frozen=True)
class Line:
    """A single-line file: `say` turns the value into a sentence; `fallback` is used when missing."""

    say: Callable[[str], str]
    fallback: str
    me_default: bool = True


@dataclass(frozen=True)
class Number:
    """A number file (leading digits of the first line); `default` when missing."""

    say: Callable[[int], str]
    default: int


@dataclass(frozen=True)
class Servers:
    """control/qmqpservers, one sentence per line."""


CLIENT_FILES: dict[str, Line | Number | Servers] = {
    "defaultdomain": Line(lambda v: f"A host name without a dot gets .{v} added", "defaultdomain"),
    "defaulthost": Line(lambda v: f"An address without a host gets @{v} added", "defaulthost"),
    "idhost": Line(lambda v: f"New Message-IDs end in @{v}", "idhost"),
    "me": Line(lambda v: f"This host is {v}", "", me_default=False),
    "plusdomain": Line(lambda v: f"A host name ending in + gets {v} in place of the +", "plusdomain"),
    "qmqpservers": Servers(),
    "timeoutconnect": Number(lambda n: f"A QMQP server gets {n} seconds to accept a connection",
                             TIMEOUT_CONNECT),
    "timeoutremote": Number(lambda n: f"A QMQP server gets {n} seconds for each read and write",
                            TIMEOUT_REMOTE),
}


def _server_sentence(server: qmqpservers.Server) -> str:
    if server.literal and server.port == PORT and ":" not in server.host:
        return f"QMQP server: {server.host}."  # qmail's own form for a plain IPv4 line
    where = "" if server.literal else " (looked up in the DNS)"
    return f"QMQP server: {server}{where}."


def _describe(control: Control, name: str, spec: Line | Number | Servers, me: str | None) -> list[str]:
    head = f"{name}: "
    try:
        if isinstance(spec, Servers):
            lines = control.lines(name)
            if lines is None:
                return [head + "(Default.) No QMQP servers; nothing can be sent."]
            if not lines:
                return [head, "No usable lines; nothing can be sent."]
            out = [head]
            for line in lines:
                server = qmqpservers.parse_line(line)
                out.append(_server_sentence(server) if server is not None
                           else f"Skipped, not a QMQP server: {printable(line)}.")
            return out
        if isinstance(spec, Number):
            if control.line(name) is None:
                return [head + f"(Default.) {spec.say(spec.default)}."]
            return [head + f"{spec.say(control.number(name, spec.default))}."]
        value = control.line(name)
    except ControlError:
        return [head + "Oops! Trouble reading this file."]
    if value is not None:
        return [head + f"{spec.say(printable(value))}."]
    if name == "me":
        return [head + "(Default.) This host has no name; set control/me."]
    fallback = me if spec.me_default and me is not None else spec.fallback
    return [head + f"(Default.) {spec.say(printable(fallback))}."]


def report(root: str) -> tuple[list[str], int]:
    """The lines qmail-showctl prints for `root`, and its exit code (111: root or control/ unreadable)."""
    if not os.path.isdir(root):
        return [f"Oops! Unable to chdir to {printable(root)}."], 111
    directory = os.path.join(root, "control")
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        return [f"Oops! Unable to read {printable(directory)}: {e.strerror or e}."], 111
    control = Control(directory)
    try:
        me = control.line("me")
    except ControlError:
        me = None  # its own line says so; the host names then show their literal defaults
    out = [f"qmail home directory: {printable(root)}.",
           "queue: none here; every message goes by QMQP to a server of control/qmqpservers."]
    for name in sorted(CLIENT_FILES):
        out += ["", *_describe(control, name, CLIENT_FILES[name], me)]
    for name in names:
        if name in CLIENT_FILES:
            continue
        if name in SERVER_FILES:
            out += ["", f"{printable(name)}: A qmail server's file; mini-qmail does not read it."]
        else:
            out += ["", f"{printable(name)}: I have no idea what this file does."]
    return out, 0
