"""RFC 822 address lists as qmail-inject reads and rewrites them (qmail-header(5), qmail-inject(8)).

The behaviour is qmail 1.03's token822.c, quote.c and qmail-inject.c,
re-created: the tokenizer (a `)` or `]` out of place, or an unterminated
quote, comment or literal, is a parse error; an atom holding a control
character, an 8-bit byte, `)`, `]` or a backslash becomes a quoted string),
the right-to-left walk over an address list that also handles groups and
route-addrs, the refolding at 80 columns, and the qualification of an
address with defaulthost, plusdomain and defaultdomain.

Text is a `str` holding one character per byte (latin-1), so every byte of
a header survives unchanged; `envelope_form()` turns an address into the
str the hand-off takes. Pure code: no files, no environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

ATOM, QUOTE, LITERAL, COMMENT, COMMA, AT, DOT, LEFT, RIGHT, SEMI, COLON = range(11)
_SINGLE = {".": DOT, ",": COMMA, "@": AT, "<": LEFT, ">": RIGHT, ":": COLON, ";": SEMI}
_PUNCT = {DOT: ".", COMMA: ",", AT: "@", LEFT: "<", RIGHT: ">", COLON: ":", SEMI: ";"}
_WORDS = (ATOM, QUOTE, LITERAL, COMMENT)
_ATOM_END = frozenset(" \t\r\n([\"<>;:@,.")
_ESCAPED = frozenset("\"[]()\\\r\n")
_DELIMS = {"\"": ("\"", QUOTE), "(": (")", COMMENT), "[": ("]", LITERAL)}
#: quote.c's table: characters a local part may hold without quotes.
_BARE = frozenset("!#$%&'*+-./0123456789=?ABCDEFGHIJKLMNOPQRSTUVWXYZ^_`abcdefghijklmnopqrstuvwxyz{|}~")
#: qmail-inject refolds rewritten fields at this column.
LINELEN = 80


class AddressError(ValueError):
    """Text that is not a parsable RFC 822 address (list)."""


class Token(NamedTuple):
    kind: int
    text: str = ""


def _needs_quotes(atom: str) -> bool:
    return any(c < " " or c > "~" or c in ")]\\" for c in atom)


def _delimited(s: str, i: int, kind: int, close: str) -> tuple[Token, int]:
    """The quote, comment or literal opening at s[i]; returns it and the index after it."""
    out: list[str] = []
    level = 1
    n = len(s)
    while True:
        i += 1
        if i >= n:
            raise AddressError("unterminated " + ("quote", "domain literal", "comment")[kind - QUOTE])
        c = s[i]
        if c == "\\":
            i += 1
            if i >= n:
                raise AddressError("backslash at the end")
            out.append(s[i])
        elif c == close:
            level -= 1
            if not level:
                return Token(kind, "".join(out)), i + 1
        elif kind == COMMENT and c == "(":
            level += 1  # nested parentheses count, but token822.c keeps neither of them
        else:
            out.append(c)


def tokenize(s: str) -> list[Token]:
    """The tokens of `s`; raises AddressError where token822_parse() fails."""
    tokens: list[Token] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c in _SINGLE:
            tokens.append(Token(_SINGLE[c]))
            i += 1
        elif c in " \t\r\n":
            i += 1
        elif c in ")]":
            raise AddressError(f"unbalanced {c!r}")
        elif c in _DELIMS:
            close, kind = _DELIMS[c]
            token, i = _delimited(s, i, kind, close)
            tokens.append(token)
        else:
            chars: list[str] = []
            while True:
                if s[i] == "\\":
                    i += 1
                    if i >= n:
                        break
                chars.append(s[i])
                i += 1
                if i >= n or s[i] in _ATOM_END:
                    break
            atom = "".join(chars)
            tokens.append(Token(QUOTE if _needs_quotes(atom) else ATOM, atom))
    return tokens


def _space_between(last: int | None, new: int) -> bool:
    if last is None:
        return False
    if last in (COLON, COMMA) or new == LEFT:
        return True
    return last in _WORDS and new in _WORDS


def _word(token: Token) -> str:
    body = "".join("\\" + c if c in _ESCAPED else c for c in token.text)
    if token.kind == QUOTE:
        return f'"{body}"'
    if token.kind == LITERAL:
        return f"[{body}]"
    if token.kind == COMMENT:
        return f"({body})"
    return body


def unparse(tokens: list[Token], linelen: int = LINELEN) -> str:
    """Tokens back to text ending in a newline, folded after commas as token822_unparse() does.

    A break (`\\n ` plus the usual space) follows every comma; the one before
    it is taken out again when the line, counted from its start to here,
    fits in `linelen` columns.
    """
    out: list[str] = []
    size = 0
    line_start = 0
    pending: int | None = None  # index in `out` of the last break still in place
    pending_at = 0  # its offset in the text; nothing before it moves any more

    def fold() -> None:
        nonlocal size, line_start, pending, pending_at
        if pending is not None and size - line_start <= linelen:
            out[pending] = ""
            size -= 2
        elif pending is not None:
            line_start = pending_at + 1
        pending, pending_at = len(out), size
        out.append("\n ")
        size += 2

    last: int | None = None
    for token in tokens:
        if _space_between(last, token.kind):
            out.append(" ")
            size += 1
        last = token.kind
        piece = _PUNCT.get(token.kind) or _word(token)
        out.append(piece)
        size += len(piece)
        if token.kind == COMMA:
            fold()
    fold()
    return "".join(out)[:-1]


def unquote(tokens: list[Token]) -> str:
    """The address as a plain string: quotes dropped, comments left out (token822_unquote)."""
    parts = []
    for t in tokens:
        if t.kind == LITERAL:
            parts.append(f"[{t.text}]")
        elif t.kind != COMMENT:
            parts.append(_PUNCT.get(t.kind) or t.text)
    return "".join(parts)


def quote_need(s: str) -> bool:
    """Whether a local part needs double quotes (quote.c)."""
    if not s or s[0] == "." or s[-1] == "." or ".." in s:
        return True
    return not set(s) <= _BARE


def quote(s: str) -> str:
    if not quote_need(s):
        return s
    return '"' + "".join("\\" + c if c in "\r\n\"\\" else c for c in s) + '"'


def quote2(s: str) -> str:
    """A plain address in RFC 822 form: the part before the last `@` quoted if need be."""
    if not s:
        return s
    local, at, domain = s.rpartition("@")
    return quote(local) + at + domain if at else quote(s)


Rewrite = Callable[[list[Token]], list[Token]]


def addrlist(tokens: list[Token], rewrite: Rewrite, start: int = 2) -> list[Token]:
    """Walk the address list in `tokens[start:]` right to left, as token822_addrlist() does.

    `rewrite` gets each address (left to right, comments inside `<>`
    included) in the order found, which is right to left, and returns its
    replacement. Groups (`name: a, b;`) and route-addrs (`phrase <addr>`)
    are understood; a misplaced `;`, `:` or `>` raises AddressError.
    Returns the whole field's tokens with every address replaced.
    """
    out: list[Token] = []  # built backwards, reversed at the end
    addr: list[Token] = []  # the address being collected, backwards too

    def flush(comma: bool = False) -> None:
        if addr:
            take()
            if comma:
                out.append(Token(COMMA))

    def take() -> None:
        out.extend(reversed(rewrite(addr[::-1])))
        addr.clear()

    in_group = False
    word_ok = True
    i = len(tokens) - 1
    while i >= start:
        t = tokens[i]
        if t.kind == SEMI:
            flush(comma=True)
            if in_group:
                raise AddressError("group inside a group")
            in_group, word_ok = True, True
            out.append(t)
            i -= 1
        elif t.kind == COLON:
            flush()
            if not in_group:
                raise AddressError("':' outside a group")
            in_group = False
            while i >= start and tokens[i].kind != COMMA:
                out.append(tokens[i])
                i -= 1
            if i >= start:
                out.append(tokens[i])
                i -= 1
            word_ok = True
        elif t.kind == RIGHT:
            flush(comma=True)
            out.append(t)
            i -= 1
            while i >= start and tokens[i].kind != LEFT:
                addr.append(tokens[i])
                i -= 1
            take()  # even when empty: that is how <> gets through
            if i < start:
                raise AddressError("'>' without '<'")
            out.append(tokens[i])
            i -= 1
            while i >= start and tokens[i].kind in (COMMENT, ATOM, QUOTE, AT, DOT):
                out.append(tokens[i])
                i -= 1
            word_ok = False
        elif t.kind in (ATOM, QUOTE, LITERAL):
            if not word_ok:
                flush(comma=True)
            word_ok = False
            addr.append(t)
            i -= 1
        elif t.kind in (COMMENT, COMMA):
            if t.kind == COMMA:
                flush()
                word_ok = True
            out.append(t)
            i -= 1
        else:  # @ . <
            word_ok = True
            addr.append(t)
            i -= 1
    flush()
    out.extend(reversed(tokens[:start]))
    out.reverse()
    return out


@dataclass(frozen=True)
class Qualifier:
    """qmail-inject's rewriting of one address, with the hosts it appends."""

    defaulthost: str
    defaultdomain: str
    plusdomain: str
    _host: list[Token] = field(init=False, repr=False, compare=False)
    _domain: list[Token] = field(init=False, repr=False, compare=False)
    _plus: list[Token] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Parsed once, as qmail-inject does at start-up; a bad value is a parse error there too.
        object.__setattr__(self, "_host", tokenize("@" + self.defaulthost))
        object.__setattr__(self, "_domain", tokenize("." + self.defaultdomain))
        object.__setattr__(self, "_plus", tokenize("." + self.plusdomain))

    def rewrite(self, a: list[Token]) -> list[Token]:
        """rwgeneric(): drop a route, a trailing `.` or `@`; add defaulthost, plusdomain, defaultdomain."""
        if not a or (len(a) >= 2 and a[-2].kind == AT and a[-1] == Token(LITERAL, "")):
            return a  # <> and x@[] stay as they are
        if a[0].kind == AT:  # @route,@route:user@host
            colon = next((k for k, t in enumerate(a) if t.kind == COLON), len(a))
            a = a[colon + 1:]
        if a and a[-1].kind == DOT:
            a = a[:-1]
        if a and a[-1].kind == AT:
            a = a[:-1]
        if not a:
            return a
        if not any(t.kind == AT for t in a):
            a = a + self._host
        last = a[-1]
        if last.kind == ATOM and last.text.endswith("+"):
            a = a[:-1] + [Token(ATOM, last.text[:-1])] + self._plus
        for t in reversed(a):
            if t.kind in (DOT, LITERAL):
                return a
            if t.kind == AT:
                break
        return a + self._domain

    def qualify(self, address: str) -> str:
        """An address given as a plain string (an argument, `-f`), rewritten; AddressError if unparsable."""
        return unquote(self.rewrite(tokenize(quote2(address))))


def check(a: list[Token], null_ok: bool) -> str | None:
    """Why the rewritten address `a` is unusable in an envelope, or None if it is fine.

    qmail-inject passes these through; here they are refused so that a
    broken header or argument never becomes a half-right recipient.
    """
    a = [t for t in a if t.kind != COMMENT]
    if not a:
        return None if null_ok else "<> is not a recipient"
    ats = [k for k, t in enumerate(a) if t.kind == AT]
    if len(ats) != 1:
        return "an address needs exactly one @"
    if ats[0] == 0 or ats[0] == len(a) - 1:
        return "nothing before or after the @"
    if any(t.kind in (LEFT, RIGHT, COMMA, COLON, SEMI) for t in a):
        return "unbalanced <> or stray punctuation"
    return None


def envelope_form(address: str) -> str:
    """A latin-1 address as the envelope str (UTF-8 with surrogate escapes) the hand-off encodes."""
    return address.encode("latin-1").decode("utf-8", "surrogateescape")
