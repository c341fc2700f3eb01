"""The constraint compilers against references: regular expressions against Python's ``re``, integer ranges
against arithmetic, JSON schemas against ``jsonschema`` (Draft 2020-12), GBNF against hand-checked strings, and
the errors a user sees for bad input."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from scratchlm.errors import ScratchLMError
from scratchlm.structured import (
    GrammarError,
    grammar_constraint,
    json_schema_constraint,
    make_constraint,
    regex_constraint,
)
from scratchlm.structured.automaton import DEAD, Automaton
from scratchlm.structured.json_schema import json_schema_grammar
from structured_helpers import AWKWARD, FIXED

PATTERNS = [r"[a-z]+", r"\d{3}-\d{4}", r"(ab|cd)*e?", r"[^x]{2,3}", r"a.c", r"(?:\w+\s?)+", r"colou?r",
            r"[A-Z][a-z]{0,3}(-[0-9]+)?", r"ü+|日本", r"\$[0-9]+\.[0-9]{2}", r"[\d\-]+", r"x{2,}y*"]


def _candidates(rng: random.Random, alphabet: str, n: int) -> list[str]:
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 7))) for _ in range(n)]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_regex_matches_like_python_re(pattern):
    """Python's ``re`` with re.ASCII: \\d \\w \\s are ASCII classes in ours (as in JSON Schema's ECMA-262 regexes
    without the u flag)."""
    rng = random.Random(pattern)
    alphabet = "abcdexyrou-$.0123456789 Aü日本\n"
    strings = _candidates(rng, alphabet, 400) + ["abc", "555-1234", "color", "colour", "Abc-12", "$12.50", "xxyy"]
    c = regex_constraint(pattern)
    agree = [(s, c.matches(s), bool(re.fullmatch(pattern, s, re.ASCII))) for s in strings]
    assert [a for a in agree if a[1] != a[2]] == []
    assert any(m for _, m, _ in agree), "no candidate matched: the comparison says nothing"
    for s, matched, _ in agree:  # every prefix of a match is alive: the automaton never strands a valid path
        if matched:
            a, sid = c.automaton, c.automaton.initial
            for b in s.encode():
                sid = a.step(sid, b)
                assert sid != DEAD


@pytest.mark.parametrize("lo,hi", [(0, 0), (0, 9), (3, 17), (-12, 7), (-300, -20), (95, 1234), (0, None),
                                   (42, None), (-7, None), (None, 13), (None, -5)])
def test_integer_bounds_accept_exactly_the_range(lo, hi):
    schema = {"type": "integer", **({} if lo is None else {"minimum": lo}), **({} if hi is None else {"maximum": hi})}
    c = json_schema_constraint(schema)
    start, stop = (lo if lo is not None else (hi or 0) - 1500), (hi if hi is not None else (lo or 0) + 1500)
    for n in range(start - 40, stop + 41):
        assert c.matches(str(n)) == ((lo is None or n >= lo) and (hi is None or n <= hi)), n
    assert not c.matches("007") and not c.matches("-0") and not c.matches("1.0")


def _compact(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


MUST_ACCEPT = {
    "person": [{"name": "Ann", "age": 0}, {"name": 'a "q" \\ ü', "age": 150, "email": "a.b@c.org", "tags": ["x", ""]}],
    "weather_call": [{"tool": "get_weather", "arguments": {"city": "Zürich 😀", "unit": "celsius"}}],
    "tree": [{"label": "r", "children": [{"label": "a", "children": []}, {"label": "b", "children": [
        {"label": "c", "children": []}]}]}],
    "mixed": [{"id": "123e4567-e89b-12d3-a456-426614174000", "score": -0.5, "choice": 3},
              {"id": "00000000-0000-0000-0000-000000000000", "when": "2024-02-29", "score": 1e5, "flag": None,
               "choice": "tab\there", "pair": [1, "ab"]}],
    "code": [{"sku": "ABC-12", "qty": 1}, {"sku": "XYZ-9999", "qty": 99}],
    "list": [[{"k": "日本"}], [{"k": "", "v": -5}, {"k": "new\nline", "v": 5}, {"k": "😀 ok"}]],
}
MUST_REJECT = {
    "person": [{"name": "Ann"}, {"name": "Ann", "age": -1}, {"age": 3, "name": "x"}, {"name": "a", "age": 1, "x": 2}],
    "weather_call": [{"tool": "other", "arguments": {"city": "a", "unit": "celsius"}}],
    "code": [{"sku": "ABC-1", "qty": 1}, {"sku": "abc-12", "qty": 1}, {"sku": "ABC-12", "qty": 100}],
    "list": [[], [{"k": "a"}]],
    "mixed": [{"id": "not-a-uuid", "score": 1, "choice": 1}],
}


@pytest.mark.parametrize("name", sorted(FIXED))
def test_schema_accepts_valid_instances_and_only_valid_ones(name):
    schema = FIXED[name]
    c = json_schema_constraint(schema)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    for value in MUST_ACCEPT[name]:
        assert validator.is_valid(value), value  # the test's own instance is right
        assert c.matches(_compact(value)), value
    for value in MUST_REJECT.get(name, []):
        assert not c.matches(_compact(value)), value
    # Soundness on random edits of valid instances: whatever the automaton accepts, jsonschema accepts.
    rng = random.Random(name)
    for value in MUST_ACCEPT[name]:
        text = _compact(value)
        for _ in range(200):
            i = rng.randrange(len(text) + 1)
            edited = text[:i] + rng.choice(['"', "1", ",", "}", "]", "a", "-", "", "null", "ü"]) + text[i + 1:]
            if c.matches(edited):
                assert validator.is_valid(json.loads(edited)), edited


def test_whitespace_is_compact_by_default_and_bounded_when_allowed():
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}}
    assert json_schema_constraint(schema).matches('{"a":[1,2]}')
    assert not json_schema_constraint(schema).matches('{"a": [1, 2]}')
    loose = json_schema_constraint(schema, max_whitespace=2)
    assert loose.matches('{ "a" : [1,\n 2] }')
    assert not loose.matches('{"a":   [1]}')  # three spaces: more than allowed


def test_any_json_and_json_object():
    any_value = json_schema_constraint({})
    for value in [1, -2.5e-3, "x", None, True, [1, [2, {}]], {"a": {"b": [None, "ü"]}}]:
        assert any_value.matches(_compact(value))
    obj = make_constraint(response_format={"type": "json_object"})
    assert obj.matches('{"k":[1,{"z":null}]}') and not obj.matches("[1]")


def test_gbnf_grammar():
    text = r'''
    root   ::= answer ("," answer)*   # comma-separated
    answer ::= "yes" | "no" | num
    num    ::= [1-9] [0-9]{0,2} | "0"
    '''
    c = grammar_constraint(text)
    for s, ok in [("yes", True), ("no,12,0", True), ("999,yes", True), ("1000", False), ("yes,", False),
                  ("01", False), ("maybe", False)]:
        assert c.matches(s) == ok, s
    unicode = grammar_constraint('root ::= [^a-z"]+ "\\u00e9" .')
    assert unicode.matches("ÄB😀é!") and not unicode.matches("abé!")


def test_recursive_gbnf_and_nesting():
    c = grammar_constraint('root ::= "(" root* ")"')
    assert c.matches("(()(()))") and not c.matches("(()")


@pytest.mark.parametrize("source,needle", [
    (dict(json_schema={"type": "object", "patternProperties": {"a": {}}}), "patternProperties"),
    (dict(json_schema={"type": "string", "contentEncoding": "base64", "uniqueItems": True}),
     "contentEncoding, uniqueItems"),
    (dict(json_schema='{"type": "object",'), "not valid JSON"),
    (dict(json_schema={"type": "array", "minItems": 3, "maxItems": 2}), "no value can match"),
    (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 2}), "no integer can match"),
    (dict(json_schema=False), "no value can match"),
    (dict(json_schema={"type": "object", "properties": {}, "required": ["x"], "additionalProperties": False}),
     "no object can match"),
    (dict(json_schema={"type": "strng"}), "type at #"),
    (dict(json_schema={"type": "string", "format": "hostname"}), "format 'hostname'"),
    (dict(json_schema={"$ref": "#/$defs/missing"}), "points to nothing"),
    (dict(json_schema={"type": "number", "minimum": 0.5}), "integer only"),
    (dict(json_schema={"type": "string", "pattern": "(a)\\1"}), "escape \\1"),
    (dict(json_schema={"type": "string", "pattern": "(?=a)a"}), "lookaround"),
    (dict(regex="a{2"), None),
    (dict(grammar='root ::= root "a" | "b"'), "left-recursive"),
    (dict(grammar='root ::= thing'), "undefined rule 'thing'"),
    (dict(grammar='root ::= "a'), "unterminated"),
    (dict(grammar='root ::= x\nx ::= x'), "cannot be satisfied"),
    (dict(response_format={"type": "xml"}), "unknown response_format"),
    (dict(json_schema={"type": "object", "properties": {}, "required": 5}), "malformed"),
    (dict(json_schema={"type": "string", "pattern": 5}), "malformed"),
    (dict(json_schema={"const": {1, 2}}), "JSON cannot write"),
    (dict(json_schema={"type": "string"}, regex="a"), "give one constraint"),
])
def test_bad_constraints_get_one_line_errors(source, needle):
    try:
        c = make_constraint(**source)
    except GrammarError as exc:
        message = str(exc)
        assert isinstance(exc, ScratchLMError) and "\n" not in message
        if needle is not None:
            assert needle in message
        return
    assert source == dict(regex="a{2") and c.matches("a{2")  # Python's re also reads "a{2" as a literal


def test_compile_limits():
    deep = {"type": "integer"}
    for _ in range(200):  # nested oneOf: vLLM's compiler hangs on these; ours is linear in the schema
        deep = {"oneOf": [deep, {"type": "string", "enum": AWKWARD}]}
    g = json_schema_grammar(deep)
    assert Automaton(g, time_limit=300).accepts(b"12")  # a generous limit: a loaded machine must not fail it
    with pytest.raises(GrammarError, match="too large"):
        Automaton(json_schema_grammar({"enum": [f"{'x' * 40}{i}" for i in range(3000)]}), max_states=100_000,
                  time_limit=300)
    with pytest.raises(GrammarError, match="too long"):
        Automaton(json_schema_grammar({"type": "string", "maxLength": 1000}), time_limit=0.0)
