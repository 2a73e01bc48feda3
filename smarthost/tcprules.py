"""tcprules(1) and tcpserver's rules lookup (ucspi-tcp 0.88 tcprules.c, rules.c), with fefe's IPv6 patch.

A rules file has one rule a line, `address:allow` or `address:deny`, then any
number of `,VAR=<q>value<q>` where <q> is any one character used on both sides.
Lines starting `#`, and lines with no colon, are skipped; trailing blanks are
trimmed. Addresses: `1.2.3.4`, a prefix ending `.` (or `:` for IPv6), a range
`1.2.3.4-20` or `1.2.0-9.` (one octet, expanded into separate keys, top capped
at 255; not for `=` or `@` forms), `=host`, `=.suffix`, `=`, `info@ip`,
`info@=host`, and the empty address: the default. The IPv6 patch splits a line
at the first colon followed by `allow` or `deny` (`::1:allow`).

The cdb is tcprules' own: key = the address, data = `D\\0` for deny, then
`+VAR=value\\0` for each variable; a key given twice keeps both records and the
first one wins. Lookup follows rules.c: INFO@IP, INFO@=HOST, IP, =HOST, IP
prefixes longest first, =HOST suffixes longest first, `=`, then the default;
nothing found means allow.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Protocol, Sequence

from smarthost import cdb


class RulesSyntaxError(ValueError):
    """tcprules' `unable to parse this line` (it exits 100)."""

    def __init__(self, line: bytes):
        super().__init__(f"unable to parse this line: {line.decode('utf-8', 'surrogateescape')}")
        self.line = line


@dataclass(frozen=True)
class Rule:
    address: bytes
    allow: bool
    env: tuple[tuple[bytes, bytes], ...] = ()

    def data(self) -> bytes:
        out = b"" if self.allow else b"D\0"
        return out + b"".join(b"+" + k + b"=" + v + b"\0" for k, v in self.env)

    def keys(self) -> list[bytes]:
        return expand(self.address)


def _trim(line: bytes) -> bytes:
    return line.rstrip(b"\n \t")


def _split(line: bytes) -> int:
    """Where the address ends: the first colon followed by allow/deny, else the first colon."""
    pos = line.find(b":")
    first = pos
    while pos >= 0:
        rest = line[pos + 1:]
        if rest.startswith(b"allow") or rest.startswith(b"deny"):
            return pos
        pos = line.find(b":", pos + 1)
    # (The IPv6 patch loops forever here; plain tcprules splits at the first colon.)
    return first


def parse_line(raw: bytes) -> Rule | None:
    """One line of a rules file; None for comments, blank lines and lines without a colon."""
    if raw.startswith(b"#"):
        return None  # tested before trimming, as tcprules.c does
    line = _trim(raw)
    colon = _split(line)
    if colon < 0:
        return None
    address, x = line[:colon], line[colon + 1:]
    if x.startswith(b"deny"):
        allow, x = False, x[4:]
    elif x.startswith(b"allow"):
        allow, x = True, x[5:]
    else:
        raise RulesSyntaxError(line)
    env = []
    while x:
        eq = x.find(b"=")
        if x[:1] != b"," or eq < 0 or eq + 1 >= len(x):
            raise RulesSyntaxError(line)
        name, quote, x = x[1:eq], x[eq + 1:eq + 2], x[eq + 2:]
        end = x.find(quote)
        if end < 0:
            raise RulesSyntaxError(line)
        env.append((name, x[:end]))
        x = x[end + 1:]
    try:
        expand(address)  # a range that is not two numbers breaks the line
    except RulesSyntaxError:
        raise RulesSyntaxError(line) from None
    return Rule(address, allow, tuple(env))


def parse(lines: Iterable[bytes]) -> Iterator[Rule]:
    """The rules of a file given as lines (bytes, with or without their newlines)."""
    for raw in lines:
        rule = parse_line(raw)
        if rule is not None:
            yield rule


def split_lines(text: bytes) -> list[bytes]:
    """Lines as tcprules' getln() sees them: split after each LF, the last one maybe without."""
    lines = text.split(b"\n")
    out = [line + b"\n" for line in lines[:-1]]
    return out + [lines[-1]] if lines[-1] else out


def _getnum(digits: bytes, line: bytes) -> int:
    # scan_ulong() must take the whole field; an empty field is 0.
    if digits and not digits.isdigit():
        raise RulesSyntaxError(line)
    return int(digits) if digits else 0


def expand(address: bytes) -> list[bytes]:
    """The cdb keys for one address: a range in one octet becomes one key per number."""
    dash = address.find(b"-")
    if dash < 0 or b"=" in address or b"@" in address:
        return [address]
    left = address.rfind(b".", 0, dash) + 1
    right = address.find(b".", dash + 1)
    right = len(address) if right < 0 else right
    bot = _getnum(address[left:dash], address)
    top = min(_getnum(address[dash + 1:right], address), 255)
    head, tail = address[:left], address[right:]
    return [head + b"%d" % n + tail for n in range(bot, top + 1)]


def records(rules: Iterable[Rule]) -> Iterator[tuple[bytes, bytes]]:
    """(key, data) for the cdb, in file order."""
    for rule in rules:
        data = rule.data()
        for key in rule.keys():
            yield key, data


def open_writer(cdb_path: str, tmp_path: str | None = None) -> cdb.Writer:
    """A cdb writer whose temporary file is `tmp_path` (tcprules' second argument)."""
    w = cdb.Writer(cdb_path)
    if tmp_path is not None and os.path.abspath(tmp_path) != os.path.abspath(w.tmp_path):
        try:
            os.rename(w.tmp_path, tmp_path)  # the open file moves with its name
        except OSError:
            w.abort()
            raise
        w.tmp_path = tmp_path
    return w


def compile_rules(lines: Iterable[bytes], cdb_path: str, tmp_path: str | None = None) -> int:
    """tcprules: compile rule lines into `cdb_path` atomically; the number of keys."""
    n = 0
    with open_writer(cdb_path, tmp_path) as w:
        for key, data in records(parse(lines)):
            w.add(key, data)
            n += 1
    return n


# -- lookup (rules.c) ----------------------------------------------------------

class Lookup(Protocol):
    def get(self, key: bytes) -> bytes | None: ...


@dataclass(frozen=True)
class Decision:
    allow: bool
    env: Mapping[str, str] = field(default_factory=dict)
    rule: bytes | None = None  # the key that matched; None for the built-in default


def decode(data: bytes, rule: bytes | None = None) -> Decision:
    """tcpserver's found(): `D` denies, `+VAR=value` sets; an unterminated tail is ignored."""
    allow = True
    env: dict[str, str] = {}
    for item in data.split(b"\0")[:-1]:
        if item.startswith(b"D"):
            allow = False
        elif item.startswith(b"+") and b"=" in item:
            name, value = item[1:].split(b"=", 1)
            if name:
                env[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return Decision(allow, env, rule)


def candidates(ip: str, host: str | None = None, info: str | None = None) -> Iterator[bytes]:
    """The keys rules.c tries, in its order."""
    bip = ip.encode("utf-8", "surrogateescape")
    bhost = host.encode("utf-8", "surrogateescape") if host else None
    if info is not None:
        binfo = info.encode("utf-8", "surrogateescape")
        yield binfo + b"@" + bip
        if bhost is not None:
            yield binfo + b"@=" + bhost
    yield bip
    if bhost is not None:
        yield b"=" + bhost
    for n in range(len(bip), 0, -1):
        if bip[n - 1] in b".:":  # ':' is the IPv6 patch's
            yield bip[:n]
    if bhost is not None:
        for i, ch in enumerate(bhost):
            if ch == 0x2E:
                yield b"=" + bhost[i:]
        yield b"="
    yield b""


def match(source: Lookup | Sequence[Rule], ip: str, host: str | None = None,
          info: str | None = None) -> Decision:
    """What the rules say for a client; allow with no variables when nothing matches."""
    if isinstance(source, Sequence):
        table: dict[bytes, bytes] = {}
        for key, data in records(source):
            table.setdefault(key, data)  # the first line wins
        lookup: Lookup = table
    else:
        lookup = source
    for key in candidates(ip, host, info):
        found = lookup.get(key)
        if found is not None:
            return decode(bytes(found), key)
    return Decision(True)


def normalize_ip(ip: str) -> str:
    """TCPREMOTEIP as the IPv6 patch writes it: compressed, IPv4-mapped shown as plain IPv4."""
    if ip.count(".") == 3 and ip.replace(".", "").isdigit():
        return ip  # already its own canonical form, or invalid and so kept as it is
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class RulesWatcher:
    """A rules cdb reopened whenever the file changes (tcpserver -x opens it per connection)."""

    def __init__(self, path: str):
        self.path = path
        self._reader: cdb.Reader | None = None
        self._stamp: tuple[int, int, int, int] | None = None

    def current(self) -> cdb.Reader | None:
        """The cdb as it is now; None when there is none. CdbError/OSError when unreadable."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self.close()
            return None
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp or self._reader is None:
            reader = cdb.Reader(self.path)
            self.close()
            self._reader, self._stamp = reader, stamp
        return self._reader

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader, self._stamp = None, None


# -- editing a rules file (smarthost rules allow|deny) -----------------------------

#: A new rules file keeps the policy of no file at all: only this host may connect.
SEED = (b"# Who may hand mail to this smart host over QMQP (tcprules syntax; the first match wins).\n"
        b"# QMQP relays to anywhere: keep the default (the empty address) a deny.\n"
        b"127.0.0.1:allow\n"
        b"::1:allow\n"
        b":deny\n")

_QUOTES = b"\"'/|%#!^~"


def rule_line(address: bytes, allow: bool, env: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """The rules-file line for a rule (no newline); ValueError if it cannot be written as one."""
    if any(c in address for c in b"\n\0") or address.startswith(b"#") or address != _trim(address):
        raise ValueError(f"unusable address {_show(address)}")
    parts = [address, b":", b"allow" if allow else b"deny"]
    for name, value in env:
        if not name or any(c in name for c in b"=,\n\0") or b"\n" in value or b"\0" in value:
            raise ValueError(f"unusable variable {_show(name)}")
        quote = next((bytes([q]) for q in _QUOTES if q not in value), None)
        if quote is None:
            raise ValueError(f"no quote character left for the value of {_show(name)}")
        parts += [b",", name, b"=", quote, value, quote]
    line = b"".join(parts)
    try:
        same = parse_line(line) == Rule(address, allow, tuple(env))
    except RulesSyntaxError as e:
        raise ValueError(f"address {_show(address)} cannot be written in a rules file ({e})") from None
    if not same:
        raise ValueError(f"address {_show(address)} cannot be written in a rules file")
    return line


def _show(value: bytes) -> str:
    return repr(value.decode("utf-8", "surrogateescape"))


def set_rule(text: bytes, line: bytes) -> bytes:
    """Put `line` into a rules file's text: in place of the rule for the same address, else
    before the default rule, else at the end. Comments and order stay as they were."""
    new = parse_line(line)
    if new is None:
        raise ValueError("not a rule")
    lines = split_lines(text)
    default = None
    for i, raw in enumerate(lines):
        rule = parse_line(raw)
        if rule is None:
            continue
        if rule.address == new.address:
            lines[i] = line + b"\n"
            return b"".join(lines)
        if rule.address == b"" and default is None:
            default = i
    if lines and not lines[-1].endswith(b"\n"):
        lines[-1] += b"\n"
    lines.insert(len(lines) if default is None else default, line + b"\n")
    return b"".join(lines)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def read_rules(rules_path: str) -> bytes | None:
    try:
        with open(rules_path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def update(rules_path: str, cdb_path: str, address: bytes, allow: bool,
           env: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """Set the rule for `address` in the rules file and recompile its cdb; the new line."""
    line = rule_line(address, allow, env)
    text = read_rules(rules_path)
    new_text = set_rule(SEED if text is None else text, line)
    list(parse(split_lines(new_text)))  # a broken file stays as it is, and says why
    _write_atomic(rules_path, new_text)
    compile_rules(split_lines(new_text), cdb_path)
    return line


def compile_file(rules_path: str, cdb_path: str) -> int:
    """Compile a rules file into its cdb; the number of keys."""
    with open(rules_path, "rb") as f:
        return compile_rules(f, cdb_path)
