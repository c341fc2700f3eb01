"""A small grammar IR over bytes: rules made of literals, byte sets, sequences, alternatives and repetitions.

Every constraint (a JSON schema, a regular expression, a GBNF grammar) is translated into this one form, and one
automaton (``automaton.py``) runs it. Matching is on bytes, not characters, because tokens are bytes: 313 of
SmolLM2's tokens are pieces of a UTF-8 character. A character class over Unicode code points therefore becomes an
alternative of UTF-8 byte sequences (``char_class``), split the way Rust's regex-syntax ``Utf8Sequences`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scratchlm.errors import ConfigError


class GrammarError(ConfigError):
    """A grammar, regular expression or JSON schema that cannot be compiled into a constraint."""


@dataclass(frozen=True)
class Bytes:
    """A literal byte string."""

    data: bytes


@dataclass(frozen=True)
class ByteSet:
    """One byte out of inclusive ranges ``((lo, hi), ...)``."""

    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Ref:
    """A call of another rule (recursion allowed, left recursion refused)."""

    name: str


@dataclass(frozen=True)
class Seq:
    items: tuple


@dataclass(frozen=True)
class Alt:
    items: tuple


@dataclass(frozen=True)
class Repeat:
    """``item`` between ``min`` and ``max`` times (``max=None``: unbounded)."""

    item: object
    min: int = 0
    max: int | None = None


EMPTY = Seq(())


@dataclass
class Grammar:
    """Named rules and the rule a match starts from."""

    rules: dict[str, object] = field(default_factory=dict)
    root: str = "root"

    def add(self, name: str, expr) -> Ref:
        self.rules[name] = expr
        return Ref(name)

    def fresh(self, prefix: str) -> str:
        """A rule name not used yet, starting with ``prefix``."""
        n = len(self.rules)
        while f"{prefix}-{n}" in self.rules:
            n += 1
        return f"{prefix}-{n}"

    def check(self) -> None:
        """Every referenced rule exists and the root can match at least one string."""
        if self.root not in self.rules:
            raise GrammarError(f"the grammar has no rule {self.root!r} to start from")
        for name, expr in self.rules.items():
            for ref in _refs(expr):
                if ref not in self.rules:
                    raise GrammarError(f"rule {name!r} uses undefined rule {ref!r}")
        productive = productive_rules(self)
        if self.root not in productive:
            raise GrammarError("the constraint cannot be satisfied: no string matches it")


def _refs(expr):
    if isinstance(expr, Ref):
        yield expr.name
    elif isinstance(expr, (Seq, Alt)):
        for item in expr.items:
            yield from _refs(item)
    elif isinstance(expr, Repeat):
        yield from _refs(expr.item)


def productive_rules(grammar: Grammar) -> set[str]:
    """Rules that match at least one finite string (a fixed point, as in textbook CFG cleaning)."""
    done: set[str] = set()

    def ok(expr) -> bool:
        if isinstance(expr, Bytes):
            return True
        if isinstance(expr, ByteSet):
            return bool(expr.ranges)
        if isinstance(expr, Ref):
            return expr.name in done
        if isinstance(expr, Seq):
            return all(ok(i) for i in expr.items)
        if isinstance(expr, Alt):
            return any(ok(i) for i in expr.items)
        if isinstance(expr, Repeat):
            return expr.min == 0 or ok(expr.item)
        raise TypeError(expr)

    changed = True
    while changed:
        changed = False
        for name, expr in grammar.rules.items():
            if name not in done and ok(expr):
                done.add(name)
                changed = True
    return done


def seq(*items) -> object:
    items = tuple(i for i in items if i != EMPTY)
    return items[0] if len(items) == 1 else Seq(items)


def alt(*items) -> object:
    return items[0] if len(items) == 1 else Alt(tuple(items))


def literal(text: str) -> Bytes:
    return Bytes(text.encode("utf-8"))


# ---- Unicode character classes as UTF-8 byte sequences ------------------------------------------------
MAX_CODEPOINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)


def normalize_ranges(ranges) -> list[tuple[int, int]]:
    """Sorted, merged, non-overlapping inclusive ranges."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(a, b) for a, b in out]


def negate_ranges(ranges, top: int = MAX_CODEPOINT) -> list[tuple[int, int]]:
    out, at = [], 0
    for lo, hi in normalize_ranges(ranges):
        if lo > at:
            out.append((at, lo - 1))
        at = hi + 1
    if at <= top:
        out.append((at, top))
    return out


def _utf8_split(lo: int, hi: int, out: list) -> None:
    """Split a code point range of one encoded length into ranges whose encodings are products of byte ranges."""
    n = len(chr(lo).encode("utf-8"))
    for i in range(1, n):
        m = (1 << (6 * i)) - 1
        if lo & ~m != hi & ~m:
            if lo & m != 0:
                _utf8_split(lo, lo | m, out)
                _utf8_split((lo | m) + 1, hi, out)
                return
            if hi & m != m:
                _utf8_split(lo, (hi & ~m) - 1, out)
                _utf8_split(hi & ~m, hi, out)
                return
    a, b = chr(lo).encode("utf-8"), chr(hi).encode("utf-8")
    out.append(tuple(zip(a, b)))


def char_class(ranges) -> object:
    """An expression matching the UTF-8 encoding of one code point in ``ranges`` (surrogates excluded)."""
    pieces: list = []
    for lo, hi in normalize_ranges(ranges):
        for a, b in ((0, 0x7F), (0x80, 0x7FF), (0x800, SURROGATES[0] - 1), (SURROGATES[1] + 1, 0xFFFF),
                     (0x10000, MAX_CODEPOINT)):
            if max(lo, a) <= min(hi, b):
                _utf8_split(max(lo, a), min(hi, b), pieces)
    ascii_ranges = tuple((p[0][0], p[0][1]) for p in pieces if len(p) == 1)
    options = [ByteSet(ascii_ranges)] if ascii_ranges else []
    options += [Seq(tuple(ByteSet(((x, y),)) for x, y in p)) for p in pieces if len(p) > 1]
    if not options:
        return ByteSet(())
    return alt(*options)
