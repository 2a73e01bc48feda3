"""Who gets a local part: qmail-users(5), qmail-newu(8), qmail-getpw(8) and qmail-lspawn's lookup.

users/assign holds lines

    =local:user:uid:gid:homedir:dash:ext:     exactly `local`
    +loc:user:uid:gid:homedir:dash:pre:       `loc` and anything longer; ext = pre + the rest

and ends with a line `.`. qmail-newu compiles it into users/cdb: key
`!` + lower(local) + NUL for `=`, `!` + lower(loc) for `+`, data the six fields
joined by NUL; the key "" holds the last characters of the non-empty `+` keys,
so that qmail-lspawn only probes the prefixes that could exist. The lookup
tries the exact key, then prefixes longest first; the first line wins among
duplicates; the rest of the local part keeps its original case.

Without users/cdb a system-mode smart host asks the password database the way
qmail-getpw does; whatever matches nothing goes to the alias user (ROOT/alias).
"""

from __future__ import annotations

import errno
import io
import os
import pwd
from dataclasses import dataclass
from typing import Iterable, Iterator

from smarthost import cdb
from smarthost.errors import TemporaryError

BREAK = "-"  # conf-break
GETPW_USERLEN = 32  # qmail-getpw.c: a candidate user name is shorter than this
ALIAS_USER = "alias"  # conf-users' alias user, whose home is ROOT/alias

# error_temp.c: a stat failing with one of these may work later, so the delivery defers.
_TEMP_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EINTR", "ENOMEM", "ETXTBSY", "EIO", "ETIMEDOUT", "EWOULDBLOCK", "EAGAIN", "EDEADLK",
        "EBUSY", "ENFILE", "EMFILE", "EFBIG", "ENOSPC", "ENETDOWN", "ENETUNREACH", "ENETRESET",
        "ECONNABORTED", "ECONNRESET", "ECONNREFUSED", "EHOSTDOWN", "EHOSTUNREACH", "ESTALE",
        "EREMOTE", "EDQUOT", "EINPROGRESS", "ENOBUFS",
    )
    if hasattr(errno, name)
)


class UsersError(TemporaryError):
    """users/assign, users/cdb or the alias user cannot be used: deliveries defer."""


class AssignError(UsersError):
    """A malformed users/assign; qmail-newu refuses it and keeps the old users/cdb."""

    def __init__(self, lineno: int, reason: str):
        super().__init__(f"line {lineno}: {reason}")
        self.lineno = lineno
        self.reason = reason


@dataclass(frozen=True)
class UserEntry:
    """qmail-lspawn's nughde: what qmail-local is run with."""

    user: str
    uid: int
    gid: int
    home: str
    dash: str
    ext: str


@dataclass(frozen=True)
class Assignment:
    """One `=` or `+` line of users/assign, its fields still the bytes of the file."""

    lineno: int
    prefix: bool  # `+` line
    local: bytes
    fields: tuple[bytes, bytes, bytes, bytes, bytes, bytes]  # user uid gid home dash ext/pre

    @property
    def key(self) -> bytes:
        # Only ASCII is case-folded, like case_lowerb.
        key = b"!" + self.local.lower()
        return key if self.prefix else key + b"\0"

    @property
    def data(self) -> bytes:
        return b"\0".join(self.fields)


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _raw(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def iter_assign(lines: Iterable[bytes]) -> Iterator[Assignment]:
    """Parse users/assign line by line (each line with its `\\n`); raise AssignError."""
    lineno = 0
    for lineno, line in enumerate(lines, 1):
        if line.startswith(b"."):
            return  # qmail-newu stops at the first line that starts with a dot
        if not line.endswith(b"\n"):
            raise AssignError(lineno, "last line is incomplete; the file must end with a line '.'")
        if b"\0" in line:
            raise AssignError(lineno, "NUL byte in line")
        kind = line[:1]
        if kind not in (b"=", b"+"):
            raise AssignError(lineno, "line must start with '=' or '+'")
        parts = line[1:].split(b":", 7)
        if len(parts) < 8:
            raise AssignError(lineno, f"expected 7 colons, found {len(parts) - 1}")
        local, user, uid, gid, home, dash, ext = parts[:7]
        if not (uid.isdigit() and gid.isdigit()):
            raise AssignError(lineno, "uid and gid must be numbers")
        yield Assignment(lineno, kind == b"+", local, (user, uid, gid, home, dash, ext))
    raise AssignError(lineno + 1, "missing final line '.'")


def parse_assign(data: bytes) -> list[Assignment]:
    """Every entry of a users/assign file held in `data`."""
    return list(iter_assign(io.BytesIO(data)))


def assign_records(assignments: Iterable[Assignment]) -> Iterator[tuple[bytes, bytes]]:
    """qmail-newu's cdb records, in file order, then the "" key of wildcard characters."""
    wild = bytearray()
    for a in assignments:
        key = a.key
        # qmail 1.03 records the unlowered last character, which makes a prefix
        # ending in a capital unreachable; the key's own (lowered) character is meant.
        if a.prefix and len(key) >= 2 and key[-1] not in wild:
            wild.append(key[-1])
        yield key, a.data
    yield b"", bytes(wild)


def compile_assign(assign_path: str, cdb_path: str) -> None:
    """qmail-newu: users/assign -> users/cdb, atomically; on AssignError the old cdb stays."""
    with open(assign_path, "rb") as f, cdb.Writer(cdb_path) as w:
        for key, data in assign_records(iter_assign(f)):
            w.add(key, data)


def _entry(data: bytes, path: str) -> UserEntry:
    fields = data.split(b"\0")
    if len(fields) != 6 or not (fields[1].isdigit() and fields[2].isdigit()):
        raise UsersError(f"trouble reading {path}: bad entry; rerun qmail-newu")
    user, uid, gid, home, dash, ext = fields
    return UserEntry(_text(user), int(uid), int(gid), _text(home), _text(dash), _text(ext))


_OPEN: dict[str, tuple[tuple[int, int, int, float], cdb.Reader]] = {}


def _reader(path: str) -> cdb.Reader | None:
    """users/cdb, opened once and kept while the file is unchanged (qmail-newu
    renames a new one into place, so a new inode or mtime means reopen).

    The delivery spawner opens it before forking, so children only stat it.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        _OPEN.pop(path, None)
        return None
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime)
    cached = _OPEN.get(path)
    if cached and cached[0] == key:
        return cached[1]
    reader = cdb.Reader(path)
    if cached:
        cached[1].close()
    _OPEN[path] = (key, reader)
    return reader


def preload(root_path: str) -> None:
    """Open users/cdb now if it exists (errors are left for the lookup to report)."""
    try:
        _reader(os.path.join(root_path, "users", "cdb"))
    except (OSError, cdb.CdbError):
        pass


def lookup(users_cdb_path: str, local: str) -> UserEntry | None:
    """qmail-lspawn's users/cdb lookup; None if there is no users/cdb or nothing matches."""
    try:
        reader = _reader(users_cdb_path)
    except (OSError, cdb.CdbError) as e:
        raise UsersError(f"trouble reading {users_cdb_path}: {getattr(e, 'strerror', None) or e}") from None
    if reader is None:
        return None
    raw = _raw(local)
    lower = b"!" + raw.lower() + b"\0"
    try:
        wild = reader.get(b"")
        if wild is None:  # qmail-lspawn: QLX_CDB
            raise UsersError(f"trouble reading {users_cdb_path}: no \"\" key; rerun qmail-newu")
        data = reader.get(lower)  # the exact key, NUL included
        if data is not None:
            return _entry(data, users_cdb_path)
        # Then `!` + every prefix, longest first; `!` alone always, the others
        # only if some `+` line ends in the same character.
        for i in range(len(lower) - 1, 0, -1):
            if i > 1 and lower[i - 1] not in wild:
                continue
            data = reader.get(lower[:i])
            if data is not None:
                return _entry(data + raw[i - 1 :], users_cdb_path)
    except cdb.CdbError as e:
        raise UsersError(f"trouble reading {users_cdb_path}: {e}") from None
    return None


def getpw(local: str, break_char: str = BREAK) -> UserEntry | None:
    """qmail-getpw without the alias fallback: the longest account name at a `-` boundary."""
    raw = _raw(local)
    brk = _raw(break_char)
    for end in range(len(raw), -1, -1):
        if end >= GETPW_USERLEN or (end < len(raw) and raw[end : end + len(brk)] != brk):
            continue
        try:
            pw = pwd.getpwnam(_text(raw[:end].lower()))
        except (KeyError, ValueError):
            continue
        if pw.pw_uid == 0:
            continue  # root never gets mail
        try:
            st = os.stat(pw.pw_dir)
        except OSError as e:
            if e.errno in _TEMP_ERRNOS:
                raise UsersError(f"trouble checking home directory of {pw.pw_name}: {e.strerror}") from None
            continue
        if st.st_uid != pw.pw_uid:
            continue  # a home the user does not own is not theirs to receive mail in
        if end == len(raw):
            return UserEntry(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, "", "")
        return UserEntry(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, "-", _text(raw[end + len(brk) :]))
    return None


def alias_entry(root_path: str, local: str, *, system_mode: bool) -> UserEntry:
    """The alias user with the whole local part as extension; no ROOT/alias defers."""
    home = os.path.join(root_path, "alias")
    try:
        st = os.stat(home)
    except FileNotFoundError:
        raise UsersError(f"Unable to find alias user! ({home} does not exist)") from None
    except OSError as e:
        raise UsersError(f"trouble checking {home}: {e.strerror}") from None
    if system_mode:
        uid, gid = st.st_uid, st.st_gid
    else:
        uid, gid = os.getuid(), os.getgid()
    return UserEntry(ALIAS_USER, uid, gid, home, "-", local)


def resolve(root_path: str, local: str, *, system_mode: bool) -> UserEntry:
    """users/cdb, then (system mode) the password database, then the alias user."""
    entry = lookup(os.path.join(root_path, "users", "cdb"), local)
    if entry is None and system_mode:
        entry = getpw(local)
    if entry is None:
        entry = alias_entry(root_path, local, system_mode=system_mode)
    return entry
