"""The .qmail file: its syntax, where qmail-local looks for it, and what programs see.

Pure code after dot-qmail(5), qmail-command(8) and qmail-local.c; the only
file access is through functions the caller passes in.

Syntax (one instruction per line, trailing spaces and tabs removed):

    #...          comment
    |command      program: /bin/sh -c command, in the home directory
    /... or .../  maildir when the line ends with `/`, else mbox
    &address      forward
    +list         from here on, forwarding only (like the execute bit)
    +other        ignored
    other text    forward to the whole line
    (empty)       ignored, except that an empty first line is an error

Search for `local = user<dash><ext>` (conf-break `-`): `.qmail<dash><safeext>`,
then `.qmail<dash><prefix>default` at each `-` boundary of safeext from the
right, ending with `.qmail<dash>default`. safeext is ext with ASCII letters
lowercased and `.` turned into `:`; DEFAULT keeps the original case.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Mapping, TypeVar

from miniqmail.mbox import from_line

T = TypeVar("T")

# A .qmail is read whole; this bounds it (some 200,000 forwarding addresses).
DOTQMAIL_MAX = 10_000_000

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class Kind(Enum):
    COMMENT = "comment"
    PROGRAM = "program"
    MBOX = "mbox"
    MAILDIR = "maildir"
    FORWARD = "forward"
    FORWARD_ONLY = "+list"


@dataclass(frozen=True)
class Instruction:
    kind: Kind
    value: str  # command, path or address; bytes decoded with os.fsdecode
    lineno: int


class DotQmailError(ValueError):
    """The .qmail contents cannot be used as they are; qmail-local defers."""

    def __init__(self, text: str, status: str = "4.3.0"):
        super().__init__(text)
        self.text = text
        self.status = status


def parse(data: bytes) -> list[Instruction]:
    """Parse .qmail contents (or qmail-start's defaultdelivery) into instructions.

    Raises DotQmailError for contents qmail-local refuses (an empty first line)
    or that cannot mean anything here (a NUL byte, `&` with no address).
    """
    if len(data) > DOTQMAIL_MAX:
        raise DotQmailError(f"Uh-oh: .qmail file is longer than {DOTQMAIL_MAX} bytes.")
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # qmail-local adds a final LF if missing, then splits at LF
    if not lines:
        lines = [b""]
    out: list[Instruction] = []
    for n, raw in enumerate(lines, 1):
        line = raw.rstrip(b" \t")
        if not line:
            if n == 1:
                raise DotQmailError("Uh-oh: first line of .qmail file is blank.", "4.2.1")
            continue
        if b"\0" in line:
            raise DotQmailError(f"Uh-oh: line {n} of .qmail file has a NUL byte.")
        text = os.fsdecode(line)
        first = line[:1]
        if first == b"#":
            out.append(Instruction(Kind.COMMENT, text, n))
        elif first == b"|":
            out.append(Instruction(Kind.PROGRAM, text[1:], n))
        elif first in (b".", b"/"):
            kind = Kind.MAILDIR if line.endswith(b"/") else Kind.MBOX
            out.append(Instruction(kind, text, n))
        elif first == b"+":
            if line == b"+list":
                out.append(Instruction(Kind.FORWARD_ONLY, text, n))
        elif first == b"&":
            if len(line) == 1:
                raise DotQmailError(f"Uh-oh: line {n} of .qmail file forwards to nobody.")
            out.append(Instruction(Kind.FORWARD, text[1:], n))
        else:
            out.append(Instruction(Kind.FORWARD, text, n))
    return out


def safe_ext(ext: str) -> str:
    """ext as it appears in file names: ASCII lowercase, `.` as `:`."""
    return ext.translate(_ASCII_LOWER).replace(".", ":")


@dataclass(frozen=True)
class Candidate:
    name: str  # file name relative to the home directory
    default: str | None  # DEFAULT for programs, when the name ends in `default`


def candidates(dash: str, ext: str) -> list[Candidate]:
    """The .qmail names qmail-local tries, in order (qmesearch())."""
    safe = safe_ext(ext)
    exact_default = ext[len(safe) - 7:] if safe.endswith("default") else None
    out = [Candidate(f".qmail{dash}{safe}", exact_default)]
    for i in range(len(safe), -1, -1):
        if i == 0 or safe[i - 1] == "-":
            out.append(Candidate(f".qmail{dash}{safe[:i]}default", ext[i:]))
    return out


def search(dash: str, ext: str, probe: Callable[[str], T | None]) -> tuple[Candidate, T] | None:
    """First candidate for which `probe(name)` returns a value (it raises to defer)."""
    for cand in candidates(dash, ext):
        found = probe(cand.name)
        if found is not None:
            return cand, found
    return None


def new_sender(sender: str, local: str, domain: str, dash: str, ext: str,
               exists: Callable[[str], bool]) -> str:
    """NEWSENDER: the envelope sender for forwarded copies (the `-owner` files)."""
    if not sender or sender == "#@[]":
        return sender
    base = f".qmail{dash}{safe_ext(ext)}"
    if not exists(base + "-owner"):
        return sender
    if exists(base + "-owner-default"):
        return f"{local}-owner-@{domain}-@[]"  # VERP: each recipient gets its own bounce address
    return f"{local}-owner@{domain}"


_QUOTE_OK = frozenset(b"!#$%&'*+-./0123456789=?ABCDEFGHIJKLMNOPQRSTUVWXYZ^_`"
                      b"abcdefghijklmnopqrstuvwxyz{|}~")


def _quote_local(box: bytes) -> bytes:
    # RFC 821 quoting as quote.c does it: only when needed.
    if (box and all(b in _QUOTE_OK for b in box) and not box.startswith(b".")
            and not box.endswith(b".") and b".." not in box):
        return box
    out = bytearray(b'"')
    for b in box:
        if b in b'\r\n"\\':
            out += b"\\"
        out.append(b)
    return bytes(out + b'"')


def quote_address(addr: str) -> bytes:
    """The address as it goes inside `<>` of a Return-Path line (quote2())."""
    raw = os.fsencode(addr)
    if not raw:
        return raw
    at = raw.rfind(b"@")
    if at < 0:
        return _quote_local(raw)
    return _quote_local(raw[:at]) + raw[at:]


def delivered_to(local: str, domain: str) -> bytes:
    """`Delivered-To: local@domain` with LF, the line the loop test looks for."""
    return b"Delivered-To: " + os.fsencode(f"{local}@{domain}").replace(b"\n", b"_") + b"\n"


def return_path(sender: str) -> bytes:
    return (b"Return-Path: <" + quote_address(sender)).replace(b"\n", b"_") + b">\n"


def _ext_parts(ext: str) -> tuple[str, str, str]:
    parts = []
    x = ext
    for _ in range(3):
        cut = x.find("-")
        x = x[cut + 1:] if cut >= 0 else ""
        parts.append(x)
    return parts[0], parts[1], parts[2]


def _host_parts(host: str) -> tuple[str, str, str]:
    parts = []
    end = len(host)
    for _ in range(3):
        dot = host.rfind(".", 0, end)
        end = dot if dot >= 0 else end
        parts.append(host[:end])
    return parts[0], parts[1], parts[2]


def program_env(base: Mapping[str, str], *, user: str, home: str, local: str, domain: str,
                ext: str, sender: str, newsender: str, default: str | None,
                when: float) -> dict[str, str]:
    """The environment qmail-command(8) describes, over qmail-start's `base`."""
    env = dict(base)
    env.pop("DEFAULT", None)  # only a default file sets it
    ext2, ext3, ext4 = _ext_parts(ext)
    host2, host3, host4 = _host_parts(domain)
    env.update(
        HOST=domain, HOME=home, USER=user, LOCAL=local, RECIPIENT=f"{local}@{domain}",
        DTLINE=os.fsdecode(delivered_to(local, domain)), SENDER=sender,
        RPLINE=os.fsdecode(return_path(sender)), UFLINE=os.fsdecode(from_line(sender, when)),
        EXT=ext, EXT2=ext2, EXT3=ext3, EXT4=ext4, HOST2=host2, HOST3=host3, HOST4=host4,
        NEWSENDER=newsender,
    )
    if default is not None:
        env["DEFAULT"] = default
    return env
