"""A regular-expression subset compiled into the grammar IR (whole-string match).

Supported: literals, ``.`` (any character but newline), classes ``[a-z0-9_]`` and ``[^...]``, escapes ``\\d \\w
\\s \\D \\W \\S \\n \\t \\r \\f \\v \\xHH \\uHHHH`` and escaped punctuation, groups ``(...)``, ``(?:...)`` and
``(?P<name>...)``, alternation ``|``, quantifiers ``* + ? {n} {n,} {n,m}`` (a lazy ``?`` after them matches the
same strings), and ``^``/``$`` at the very start/end. Refused with an error: backreferences, lookaround, word
boundaries, anchors elsewhere, inline flags. With ``json_string=True`` the expression describes the *content*
of a JSON string: characters that JSON must escape (``"``, ``\\``, controls) are emitted in escaped form.
"""

from __future__ import annotations

from scratchlm.structured.grammar import (
    EMPTY,
    Bytes,
    GrammarError,
    Repeat,
    alt,
    char_class,
    literal,
    negate_ranges,
    normalize_ranges,
    seq,
)

DIGIT = [(0x30, 0x39)]
WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
SPACE = [(0x09, 0x0D), (0x20, 0x20)]
CLASS_ESCAPES = {"d": DIGIT, "w": WORD, "s": SPACE}
CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}
JSON_SHORT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}
MAX_REPEAT = 1000


def json_escaped(cp: int) -> str:
    ch = chr(cp)
    return JSON_SHORT.get(ch) or (f"\\u{cp:04x}" if cp < 0x20 else ch)


def class_expr(ranges, json_string: bool):
    """One character out of ``ranges``; inside a JSON string, the characters JSON escapes in escaped form."""
    ranges = normalize_ranges(ranges)
    if not json_string:
        return char_class(ranges)
    must_escape = [cp for cp in list(range(0x20)) + [0x22, 0x5C] if any(lo <= cp <= hi for lo, hi in ranges)]
    plain = [r for r in negate_ranges(negate_ranges(ranges) + [(0, 0x1F), (0x22, 0x22), (0x5C, 0x5C)])]
    options = [char_class(plain)] if plain else []
    options += [literal(json_escaped(cp)) for cp in must_escape]
    if not options:
        raise GrammarError("a regular-expression class matches no character")
    return alt(*options)


class RegexParser:
    def __init__(self, pattern: str, json_string: bool = False):
        self.p, self.i, self.json = pattern, 0, json_string

    def error(self, what: str) -> GrammarError:
        return GrammarError(f"regular expression {self.p!r}: {what} at position {self.i} (supported: literals, "
                            ". [classes] \\d\\w\\s groups | * + ? {{n,m}}, ^ and $ at the ends)")

    def peek(self) -> str:
        return self.p[self.i] if self.i < len(self.p) else ""

    def parse(self):
        if self.p.startswith("^"):
            self.i = 1
        expr = self.alternatives()
        if self.i < len(self.p):
            raise self.error(f"unexpected {self.peek()!r}")
        return expr

    def alternatives(self):
        options = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.sequence())
        return alt(*options)

    def sequence(self):
        items = []
        while self.peek() not in ("", "|", ")"):
            if self.peek() == "$" and self.i == len(self.p) - 1:
                self.i += 1
                break
            items.append(self.quantified(self.atom()))
        return seq(*items) if items else EMPTY

    def quantified(self, atom):
        while True:
            c = self.peek()
            if c == "*":
                lo, hi = 0, None
            elif c == "+":
                lo, hi = 1, None
            elif c == "?":
                lo, hi = 0, 1
            elif c == "{" and self._is_counter():
                lo, hi = self._counter()
                self.i -= 1
            else:
                return atom
            self.i += 1
            if self.peek() == "?":  # lazy: the same set of whole-string matches
                self.i += 1
            elif self.peek() == "+":
                raise self.error("possessive quantifiers are not supported")
            if hi is not None and hi < lo:
                raise self.error(f"{{{lo},{hi}}} has its bounds reversed")
            if max(lo, hi or 0) > MAX_REPEAT:
                raise self.error(f"repetition counts above {MAX_REPEAT} are not supported")
            atom = Repeat(atom, lo, hi)

    def _is_counter(self) -> bool:
        end = self.p.find("}", self.i)
        body = self.p[self.i + 1:end] if end > 0 else ""
        parts = body.split(",")
        return end > 0 and len(parts) <= 2 and parts[0].isdigit() and all(p.isdigit() or p == "" for p in parts)

    def _counter(self) -> tuple[int, int | None]:
        end = self.p.index("}", self.i)
        parts = self.p[self.i + 1:end].split(",")
        self.i = end + 1
        lo = int(parts[0])
        return lo, (lo if len(parts) == 1 else int(parts[1]) if parts[1] else None)

    def atom(self):
        c = self.peek()
        if c == "(":
            self.i += 1
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?P<", self.i) or (self.p.startswith("?<", self.i) and self.p[self.i + 2:self.i + 3]
                                                      not in ("=", "!")):
                self.i = self.p.index(">", self.i) + 1
            elif c == "(" and self.peek() == "?":
                raise self.error("lookaround and inline flags are not supported")
            expr = self.alternatives()
            if self.peek() != ")":
                raise self.error("missing )")
            self.i += 1
            return expr
        if c == "[":
            return class_expr(self.char_class(), self.json)
        if c == ".":
            self.i += 1
            return class_expr(negate_ranges([(0x0A, 0x0A)]), self.json)
        if c in "^$":
            raise self.error(f"anchor {c!r} is only supported at the very start/end")
        if c in "*+?":
            raise self.error(f"nothing to repeat before {c!r}")
        if c == "\\":
            ranges = self.escape()
            return class_expr(ranges, self.json)
        self.i += 1
        return class_expr([(ord(c), ord(c))], self.json)

    def escape(self) -> list[tuple[int, int]]:
        """After a backslash: the code point ranges of the escape."""
        self.i += 1
        c = self.peek()
        self.i += 1
        if c.lower() in CLASS_ESCAPES:
            ranges = CLASS_ESCAPES[c.lower()]
            return negate_ranges(ranges) if c.isupper() else list(ranges)
        if c in CHAR_ESCAPES:
            return [(ord(CHAR_ESCAPES[c]),) * 2]
        if c in "xu":
            n = 2 if c == "x" else 4
            digits = self.p[self.i:self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"\\{c} needs {n} hex digits")
            self.i += n
            return [(int(digits, 16),) * 2]
        if c == "" or c.isalnum():
            raise self.error(f"escape \\{c} is not supported")
        return [(ord(c), ord(c))]

    def char_class(self) -> list[tuple[int, int]]:
        self.i += 1
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            c = self.peek()
            if c == "":
                raise self.error("missing ]")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            if c == "\\":
                got = self.escape()
                if len(got) != 1 or got[0][0] != got[0][1]:
                    ranges += got
                    continue
                lo = got[0][0]
            else:
                lo = ord(c)
                self.i += 1
            if self.peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                if self.peek() == "\\":
                    got = self.escape()
                    hi = got[0][0]
                else:
                    hi = ord(self.peek())
                    self.i += 1
                if hi < lo:
                    raise self.error("class range out of order")
                ranges.append((lo, hi))
            else:
                ranges.append((lo, lo))
        return negate_ranges(ranges) if negate else ranges


def regex_expr(pattern: str, json_string: bool = False):
    """The grammar expression of a whole-string match of ``pattern``."""
    return RegexParser(pattern, json_string).parse()


def search_expr(pattern: str, json_string: bool = False):
    """JSON Schema's ``pattern`` searches (it is not anchored): wrap unanchored ends with ``.*``."""
    expr = regex_expr(pattern, json_string)
    anything = Repeat(class_expr(negate_ranges([]), json_string), 0, None)
    starts = pattern.startswith("^")
    ends = pattern.endswith("$") and not pattern.endswith("\\$")
    return seq(*([] if starts else [anything]), expr, *([] if ends else [anything]))


__all__ = ["regex_expr", "search_expr", "class_expr", "Bytes"]
