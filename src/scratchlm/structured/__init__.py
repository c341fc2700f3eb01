"""Structured output: JSON schema, regular expression or GBNF grammar -> byte automaton -> allowed-token masks.

    constraint = json_schema_constraint({"type": "object", "properties": {"name": {"type": "string"}},
                                         "required": ["name"]})
    llm.generate(prompt, constraint=constraint)       # or llm.chat(messages, response_format=...)

Modules, one concept each: ``grammar`` (the IR), ``json_schema``, ``regex`` and ``gbnf`` (front ends into it),
``automaton`` (the byte-level pushdown recogniser), ``masks`` (vocabulary trie, cached masks, per-sequence state).
Compiled constraints are cached by their source, so a schema used again costs nothing to compile and finds its
masks already computed.
"""

from __future__ import annotations

import json
import weakref
from collections import OrderedDict

from scratchlm.structured.automaton import Automaton
from scratchlm.structured.gbnf import parse_gbnf
from scratchlm.structured.grammar import Grammar, GrammarError
from scratchlm.structured.json_schema import json_object_grammar, json_schema_grammar, parse_schema
from scratchlm.structured.masks import TokenConstraint, TokenMasks
from scratchlm.structured.regex import regex_expr

CACHE_SIZE = 64


class Constraint:
    """A compiled constraint, independent of any tokenizer; ``start`` gives one sequence its state."""

    def __init__(self, grammar: Grammar, description: str):
        self.automaton = Automaton(grammar)
        self.description = description
        self._masks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def masks(self, tokenizer, eos_ids: set[int]) -> TokenMasks:
        by_eos = self._masks.setdefault(tokenizer, {})
        key = frozenset(eos_ids)
        if key not in by_eos:
            by_eos[key] = TokenMasks(self.automaton, tokenizer, eos_ids)
        return by_eos[key]

    def start(self, tokenizer, eos_ids: set[int]) -> TokenConstraint:
        """A fresh per-sequence state over ``tokenizer``'s vocabulary."""
        return TokenConstraint(self.masks(tokenizer, eos_ids))

    def matches(self, text: str) -> bool:
        """Whether ``text`` is a complete match."""
        return self.automaton.accepts(text.encode("utf-8"))

    def __repr__(self) -> str:
        return f"Constraint({self.description})"


_CACHE: OrderedDict[tuple, Constraint] = OrderedDict()


def _cached(key: tuple, build) -> Constraint:
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    try:
        constraint = build()
    except RecursionError:
        raise GrammarError("the constraint is nested too deeply to compile: flatten it") from None
    _CACHE[key] = constraint
    if len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return constraint


def json_schema_constraint(schema, max_whitespace: int = 0) -> Constraint:
    """JSON text valid under ``schema`` (a dict, a bool, or JSON text)."""
    schema = parse_schema(schema)
    try:
        key = ("json_schema", json.dumps(schema, sort_keys=True), max_whitespace)
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"the JSON schema holds a value JSON cannot write: {exc}") from None
    return _cached(key, lambda: Constraint(json_schema_grammar(schema, max_whitespace), "json schema"))


def json_object_constraint(max_whitespace: int = 0) -> Constraint:
    """Any JSON object."""
    return _cached(("json_object", max_whitespace),
                   lambda: Constraint(json_object_grammar(max_whitespace), "json object"))


def regex_constraint(pattern: str) -> Constraint:
    """Text that ``pattern`` matches in full (the subset in ``structured/regex.py``)."""
    def build():
        g = Grammar()
        g.rules["root"] = regex_expr(pattern)
        return Constraint(g, f"regex {pattern!r}")
    return _cached(("regex", pattern), build)


def grammar_constraint(text: str) -> Constraint:
    """Text that the GBNF grammar ``text`` derives from its ``root`` rule."""
    return _cached(("gbnf", text), lambda: Constraint(parse_gbnf(text), "grammar"))


def response_format_constraint(response_format) -> Constraint | None:
    """The constraint of an OpenAI ``response_format``: ``{"type": "text"}`` (none), ``{"type": "json_object"}``,
    or ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise GrammarError("response_format must be an object with a type: text, json_object or json_schema")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_constraint()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise GrammarError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
        return json_schema_constraint(spec["schema"])
    raise GrammarError(f"unknown response_format type {kind!r}: use text, json_object or json_schema")


def make_constraint(grammar=None, json_schema=None, regex=None, response_format=None) -> Constraint | None:
    """At most one constraint from the keyword that gives it (``grammar`` may be GBNF text or a Constraint)."""
    given = {k: v for k, v in dict(grammar=grammar, json_schema=json_schema, regex=regex,
                                   response_format=response_format).items() if v is not None}
    if len(given) > 1:
        raise GrammarError(f"give one constraint, not {' and '.join(given)}")
    if grammar is not None:
        return grammar if isinstance(grammar, Constraint) else grammar_constraint(grammar)
    if json_schema is not None:
        return json_schema_constraint(json_schema)
    if regex is not None:
        return regex_constraint(regex)
    return response_format_constraint(response_format)


__all__ = ["Constraint", "GrammarError", "TokenConstraint", "json_schema_constraint", "json_object_constraint",
           "regex_constraint", "grammar_constraint", "response_format_constraint", "make_constraint"]
