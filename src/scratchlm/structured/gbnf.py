"""GBNF, llama.cpp's grammar format (``grammars/README.md`` there), parsed into the grammar IR.

    root   ::= answer ("," answer)*
    answer ::= "yes" | "no" | [0-9]+      # comments run to the end of the line

Supported: ``name ::= alternatives`` (names of letters, digits and ``-``; the start rule is ``root``), string
literals with escapes (``\\n \\t \\r \\\\ \\" \\xHH \\uHHHH \\UHHHHHHHH``), character classes ``[a-z]`` and
``[^...]``, ``.`` (any character), groups, ``|``, and the postfix operators ``* + ? {m} {m,} {m,n}``. A rule ends
at a newline unless a group is open or the line ends with ``|``/``::=``. Left recursion is refused (as llama.cpp
does) when the automaton is built.
"""

from __future__ import annotations

from scratchlm.structured.grammar import EMPTY, Grammar, GrammarError, Ref, Repeat, alt, char_class, seq

ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-", "^": "^"}
MAX_REPEAT = 1000


class GBNFParser:
    def __init__(self, text: str):
        self.t, self.i, self.line = text, 0, 1

    def error(self, what: str) -> GrammarError:
        return GrammarError(f"grammar line {self.line}: {what}")

    def peek(self, n: int = 1) -> str:
        return self.t[self.i:self.i + n]

    def skip(self, newlines: bool) -> None:
        while self.i < len(self.t):
            c = self.t[self.i]
            if c == "#":
                while self.i < len(self.t) and self.t[self.i] != "\n":
                    self.i += 1
            elif c in " \t\r" or (newlines and c == "\n"):
                self.line += c == "\n"
                self.i += 1
            else:
                return

    def name(self) -> str:
        start = self.i
        while self.i < len(self.t) and (self.t[self.i].isalnum() or self.t[self.i] in "-_"):
            self.i += 1
        if start == self.i:
            raise self.error(f"expected a rule name, found {self.peek()!r}")
        return self.t[start:self.i]

    def parse(self) -> Grammar:
        g = Grammar()
        self.skip(True)
        while self.i < len(self.t):
            name = self.name()
            self.skip(False)
            if self.peek(3) != "::=":
                raise self.error(f"expected ::= after {name!r}")
            self.i += 3
            self.skip(True)
            if name in g.rules:
                raise self.error(f"rule {name!r} is defined twice")
            g.rules[name] = self.alternatives(nested=False)
            self.skip(True)
        if not g.rules:
            raise GrammarError("the grammar is empty: define at least `root ::= ...`")
        g.check()
        return g

    def alternatives(self, nested: bool):
        options = [self.sequence(nested)]
        while self.peek() == "|":
            self.i += 1
            self.skip(True)
            options.append(self.sequence(nested))
        return alt(*options)

    def sequence(self, nested: bool):
        items = []
        while True:
            self.skip(nested)
            c = self.peek()
            if c in ("", "|", ")", "\n"):
                break
            items.append(self.postfix(self.term(nested)))
        return seq(*items) if items else EMPTY

    def postfix(self, term):
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.i += 1
                term = Repeat(term, *{"*": (0, None), "+": (1, None), "?": (0, 1)}[c])
            elif c == "{":
                end = self.t.find("}", self.i)
                parts = [p.strip() for p in self.t[self.i + 1:end].split(",")] if end > 0 else []
                if not parts or len(parts) > 2 or not parts[0].isdigit() or not all(p.isdigit() or p == ""
                                                                                    for p in parts):
                    raise self.error("a repetition is {m}, {m,} or {m,n}")
                lo = int(parts[0])
                hi = lo if len(parts) == 1 else (int(parts[1]) if parts[1] else None)
                if max(lo, hi or 0) > MAX_REPEAT or (hi is not None and hi < lo):
                    raise self.error(f"bad repetition {{{lo},{hi}}} (at most {MAX_REPEAT}, m <= n)")
                self.i = end + 1
                term = Repeat(term, lo, hi)
            else:
                return term

    def term(self, nested: bool):
        c = self.peek()
        if c == '"':
            self.i += 1
            chars = []
            while self.peek() != '"':
                if self.peek() in ("", "\n"):
                    raise self.error("unterminated string literal")
                chars.append(self.char())
            self.i += 1
            return seq(*(char_class([(cp, cp)]) for cp in chars)) if chars else EMPTY
        if c == "[":
            self.i += 1
            negate = self.peek() == "^"
            self.i += negate
            ranges = []
            while self.peek() != "]":
                if self.peek() in ("", "\n"):
                    raise self.error("unterminated character class")
                lo = self.char()
                hi = lo
                if self.peek() == "-" and self.peek(2) != "-]" and self.t[self.i + 1:self.i + 2] != "]":
                    self.i += 1
                    hi = self.char()
                    if hi < lo:
                        raise self.error("character range out of order")
                ranges.append((lo, hi))
            self.i += 1
            if negate:
                from scratchlm.structured.grammar import negate_ranges

                ranges = negate_ranges(ranges)
            return char_class(ranges)
        if c == ".":
            self.i += 1
            return char_class([(0, 0x10FFFF)])
        if c == "(":
            self.i += 1
            self.skip(True)
            inner = self.alternatives(nested=True)
            self.skip(True)
            if self.peek() != ")":
                raise self.error("missing )")
            self.i += 1
            return inner
        return Ref(self.name())

    def char(self) -> int:
        """One (possibly escaped) character of a literal or class, as a code point."""
        c = self.t[self.i]
        self.i += 1
        if c != "\\":
            return ord(c)
        e = self.peek()
        self.i += 1
        if e in ESCAPES:
            return ord(ESCAPES[e])
        n = {"x": 2, "u": 4, "U": 8}.get(e)
        digits = self.t[self.i:self.i + (n or 0)]
        if n is None or len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
            raise self.error(f"unknown escape \\{e}")
        self.i += n
        return int(digits, 16)


def parse_gbnf(text: str) -> Grammar:
    """A GBNF grammar text as a Grammar (start rule ``root``)."""
    return GBNFParser(text).parse()
