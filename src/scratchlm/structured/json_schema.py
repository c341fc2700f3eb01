"""JSON Schema (a practical subset of Draft 2020-12) compiled into the grammar IR.

The output is compact JSON by default (``{"a":1,"b":[true,null]}``, no spaces); ``max_whitespace=n`` allows up to
``n`` whitespace characters around each ``{ } [ ] , :`` (never more, so a model cannot stall on spaces).
Properties come in the order the schema lists them; required ones always, optional ones may be left out.
Choices that follow OpenAI's structured outputs and xgrammar's ``strict_mode``: an object that lists
``properties`` allows no other keys unless ``additionalProperties`` says so, and an array with ``prefixItems``
allows more items only when ``items`` is given. ``oneOf`` is compiled as ``anyOf`` (exclusivity is not enforced,
as in llama.cpp and xgrammar). Unsupported keywords are refused by name, never ignored.
"""

from __future__ import annotations

import json
import time

from scratchlm.structured.grammar import (
    EMPTY,
    ByteSet,
    Grammar,
    GrammarError,
    Ref,
    Repeat,
    alt,
    char_class,
    literal,
    seq,
)
from scratchlm.structured.regex import regex_expr, search_expr

ANNOTATIONS = {"title", "description", "$schema", "$id", "$comment", "examples", "default", "deprecated",
               "readOnly", "writeOnly"}
SUPPORTED = {"type", "properties", "required", "additionalProperties", "enum", "const", "anyOf", "oneOf", "allOf",
             "$ref", "$defs", "definitions", "items", "prefixItems", "minItems", "maxItems", "minLength", "maxLength",
             "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
# Formats as regular expressions over the string's content (RFC 3339 dates and times, RFC 4122 UUIDs, and a
# plain user@domain.tld email).
FORMATS = {
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "time": r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "email": r"[a-zA-Z0-9._%+-]+@[a-zA-Z0-9-]+(\.[a-zA-Z0-9-]+)*\.[a-zA-Z]{2,}",
}
FORMATS["date-time"] = FORMATS["date"] + "T" + FORMATS["time"]
DIGIT = ByteSet(((0x30, 0x39),))
NONZERO = ByteSet(((0x31, 0x39),))
WHITESPACE = ByteSet(((0x09, 0x0A), (0x0D, 0x0D), (0x20, 0x20)))
MAX_DIGITS = 16  # of an unbounded integer, and of a fraction
MAX_COUNT = 1000  # minItems/maxItems/minLength/maxLength beyond this unroll too far


class SchemaCompiler:
    """Translate one schema; ``compile()`` returns the grammar. Shared rules (strings, numbers, any value) are
    made once; each ``$ref`` target becomes one rule, so recursive schemas work."""

    def __init__(self, schema, max_whitespace: int = 0, time_limit: float = 5.0):
        self.root_schema = schema
        self.g = Grammar()
        self.ws = Repeat(WHITESPACE, 0, max_whitespace) if max_whitespace > 0 else EMPTY
        self.refs: dict[str, Ref] = {}
        self.deadline = time.monotonic() + time_limit

    def compile(self) -> Grammar:
        self.g.rules["root"] = EMPTY  # reserve the name; "#" refers to it
        self.refs["#"] = Ref("root")
        self.g.rules["root"] = self.schema(self.root_schema, "#")
        self.g.check()
        return self.g

    # ---- shared rules ---------------------------------------------------------------------------------
    def shared(self, name: str, build) -> Ref:
        if name not in self.g.rules:
            self.g.rules[name] = EMPTY
            self.g.rules[name] = build()
        return Ref(name)

    def char(self):
        """One character of a JSON string's content, escapes included (RFC 8259 sec. 7). An expression, not a
        rule: inlined, the string's loop is one stack top whose mask is context-independent (masks.py)."""
        plain = char_class([(0x20, 0x21), (0x23, 0x5B), (0x5D, 0x10FFFF)])
        hexdigit = ByteSet(((0x30, 0x39), (0x41, 0x46), (0x61, 0x66)))
        escape = seq(literal("\\"), alt(ByteSet(tuple((ord(c), ord(c)) for c in sorted('"\\/bfnrt'))),
                                         seq(literal("u"), Repeat(hexdigit, 4, 4))))
        return alt(plain, escape)

    def string(self) -> Ref:
        return self.shared("string", lambda: seq(literal('"'), Repeat(self.char(), 0, None), literal('"')))

    # Digits are bounded (as llama.cpp's json-schema-to-grammar does): a greedy small model otherwise writes
    # "1000000000..." until the token budget runs out. 16 digits hold any float64 integer part exactly.
    def integer(self) -> Ref:
        return self.shared("integer", lambda: seq(Repeat(literal("-"), 0, 1), alt(
            literal("0"), seq(NONZERO, Repeat(DIGIT, 0, MAX_DIGITS - 1)))))

    def number(self) -> Ref:
        return self.shared("number", lambda: seq(
            self.integer(), Repeat(seq(literal("."), Repeat(DIGIT, 1, MAX_DIGITS)), 0, 1),
            Repeat(seq(ByteSet(((0x45, 0x45), (0x65, 0x65))), Repeat(ByteSet(((0x2B, 0x2B), (0x2D, 0x2D))), 0, 1),
                       Repeat(DIGIT, 1, 3)), 0, 1)))

    def any_value(self) -> Ref:
        return self.shared("value", lambda: alt(self.any_object(), self.any_array(), self.string(), self.number(),
                                                literal("true"), literal("false"), literal("null")))

    def any_object(self) -> Ref:
        return self.shared("object", lambda: self.object_of([], set(), True))

    def any_array(self) -> Ref:
        return self.shared("array", lambda: self.array_of([], self.any_value(), 0, None))

    # ---- schemas -----------------------------------------------------------------------------------------
    def schema(self, s, path: str):
        if time.monotonic() > self.deadline:
            raise GrammarError("compiling the JSON schema took too long: simplify it")
        if s is True or s == {}:
            return self.any_value()
        if s is False:
            raise GrammarError(f"the schema at {path} is false: no value can match it")
        if not isinstance(s, dict):
            raise GrammarError(f"the schema at {path} must be an object or a boolean, not {type(s).__name__}")
        unknown = sorted(set(s) - SUPPORTED - ANNOTATIONS)
        if unknown:
            raise GrammarError(f"unsupported JSON schema keyword{'s' if len(unknown) > 1 else ''} at {path}: "
                               f"{', '.join(unknown)}")
        s = {k: v for k, v in s.items() if k not in ANNOTATIONS and k not in ("$defs", "definitions")}
        if "$ref" in s:
            if len(s) > 1:
                raise GrammarError(f"$ref beside other keywords at {path} is not supported: use allOf")
            return self.ref(s["$ref"])
        if "allOf" in s:
            parts = [self.resolve(p) for p in s.pop("allOf")] + [s]
            return self.schema(merge_all_of(parts, path), path)
        for key in ("anyOf", "oneOf"):
            if key in s:
                branches = s.pop(key)
                if not isinstance(branches, list) or not branches:
                    raise GrammarError(f"{key} at {path} must be a non-empty list of schemas")
                return alt(*(self.schema(merge_siblings(s, self.resolve(b), path), f"{path}/{key}/{i}")
                             for i, b in enumerate(branches)))
        if "const" in s:
            return literal(json.dumps(s["const"], ensure_ascii=False, separators=(",", ":")))
        if "enum" in s:
            if not isinstance(s["enum"], list) or not s["enum"]:
                raise GrammarError(f"enum at {path} must be a non-empty list")
            return alt(*(literal(json.dumps(v, ensure_ascii=False, separators=(",", ":"))) for v in s["enum"]))
        types = s.get("type", infer_types(s))
        types = [types] if isinstance(types, str) else types
        if not isinstance(types, list) or not types or any(t not in TYPES for t in types):
            raise GrammarError(f"type at {path} must be one of {', '.join(TYPES)} or a non-empty list of them")
        return alt(*(self.typed(t, s, path) for t in dict.fromkeys(types)))

    def typed(self, kind: str, s: dict, path: str):
        if kind == "null":
            return literal("null")
        if kind == "boolean":
            return alt(literal("true"), literal("false"))
        if kind == "integer":
            lo, hi = integer_bounds(s, path)
            return self.integer() if lo is None and hi is None else integer_range(lo, hi)
        if kind == "number":
            if any(k in s for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
                raise GrammarError(f"minimum/maximum at {path} are supported for type integer only")
            return self.number()
        if kind == "string":
            return self.string_schema(s, path)
        if kind == "array":
            return self.array_schema(s, path)
        return self.object_schema(s, path)

    def string_schema(self, s: dict, path: str):
        lo, hi = count_bounds(s, "minLength", "maxLength", path)
        if "format" in s and "pattern" in s:
            raise GrammarError(f"format and pattern together at {path} are not supported")
        if "format" in s:
            if s["format"] not in FORMATS:
                raise GrammarError(f"format {s['format']!r} at {path} is not supported "
                                   f"(supported: {', '.join(sorted(FORMATS))})")
            body = regex_expr(FORMATS[s["format"]], json_string=True)
        elif "pattern" in s:
            if "minLength" in s or "maxLength" in s:
                raise GrammarError(f"pattern with minLength/maxLength at {path} is not supported")
            body = search_expr(s["pattern"], json_string=True)
        elif lo == 0 and hi is None:
            return self.string()
        else:
            body = Repeat(self.char(), lo, hi)
        return seq(literal('"'), body, literal('"'))

    def array_schema(self, s: dict, path: str):
        lo, hi = count_bounds(s, "minItems", "maxItems", path)
        prefix = [self.schema(p, f"{path}/prefixItems/{i}") for i, p in enumerate(s.get("prefixItems", []))]
        if "items" in s and s["items"] is not False:
            item = self.schema(s["items"], f"{path}/items")
        elif "prefixItems" in s or s.get("items") is False:
            item = None
        else:
            item = self.any_value()
        return self.array_of(prefix, item, lo, hi, path)

    def array_of(self, prefix: list, item, lo: int, hi: int | None, path: str = "#"):
        ws, comma = self.ws, seq(self.ws, literal(","), self.ws)
        k = len(prefix)
        if hi is not None and hi < k:
            raise GrammarError(f"maxItems at {path} is smaller than the number of prefixItems")
        if item is None:
            if lo > k:
                raise GrammarError(f"minItems at {path} needs more items than prefixItems allows")
            rest_lo, rest_hi = 0, 0
        else:
            rest_lo, rest_hi = max(0, lo - k), (None if hi is None else hi - k)
        parts = []
        for i, p in enumerate(prefix):
            parts += [comma, p] if i else [p]
        if item is not None and rest_hi != 0:
            if k:  # every further item follows a comma
                parts.append(Repeat(seq(comma, item), rest_lo, rest_hi))
            else:
                more = Repeat(seq(comma, item), max(0, rest_lo - 1), None if rest_hi is None else rest_hi - 1)
                parts.append(seq(item, more) if rest_lo >= 1 else Repeat(seq(item, more), 0, 1))
        return seq(literal("["), ws, *parts, ws, literal("]"))

    def object_schema(self, s: dict, path: str):
        props = s.get("properties", {})
        if not isinstance(props, dict):
            raise GrammarError(f"properties at {path} must be an object")
        required = set(s.get("required", []))
        missing = required - set(props)
        extra = s.get("additionalProperties", "properties" not in s)
        if missing and extra is False:
            raise GrammarError(f"required properties {sorted(missing)} at {path} are not in properties and "
                               "additionalProperties is false: no object can match")
        for name in sorted(missing):  # required but only allowed as additional properties: list them first
            props = {name: extra if extra is not True else {}, **props}
        members = [(name, self.schema(sub, f"{path}/properties/{name}")) for name, sub in props.items()]
        extra_value = None if extra is False else self.schema(extra, f"{path}/additionalProperties")
        return self.object_of(members, required, extra_value)

    def object_of(self, members: list, required: set, extra):
        """``{...}`` with ``members`` [(name, value expr)] in order (optional ones skippable), then any number of
        further string keys with ``extra`` values (``True``: any value; ``None``: none)."""
        ws = self.ws
        comma, colon = seq(ws, literal(","), ws), seq(ws, literal(":"), ws)
        if extra is True:
            extra = self.any_value()
        pair = [seq(literal(json.dumps(n, ensure_ascii=False)), colon, v) for n, v in members]
        extra_pair = None if extra is None else seq(self.string(), colon, extra)
        # tail[i][c]: the members from i on, c = whether a comma must come before the next one.
        tail: dict[tuple[int, bool], object] = {}
        for c in (False, True):
            lead = comma if c else EMPTY
            tail[len(members), c] = EMPTY if extra_pair is None else Repeat(
                seq(lead, extra_pair, Repeat(seq(comma, extra_pair), 0, None)), 0, 1)
        for i in range(len(members) - 1, -1, -1):
            for c in (False, True):
                take = seq(comma if c else EMPTY, pair[i], self.rule(tail[i + 1, True]))
                tail[i, c] = take if members[i][0] in required else alt(take, self.rule(tail[i + 1, c]))
        return seq(literal("{"), ws, tail[0, False], ws, literal("}"))

    def rule(self, expr):
        """``expr`` as its own rule when it is big, so that shared tails are not copied."""
        if expr == EMPTY or isinstance(expr, Ref):
            return expr
        name = self.g.fresh("members")
        self.g.rules[name] = expr
        return Ref(name)

    # ---- references ---------------------------------------------------------------------------------------
    def resolve(self, s):
        """A schema with its top-level ``$ref`` followed (for allOf/anyOf merging)."""
        seen = set()
        while isinstance(s, dict) and set(s) - ANNOTATIONS == {"$ref"}:
            if s["$ref"] in seen:
                raise GrammarError(f"$ref cycle through {s['$ref']}")
            seen.add(s["$ref"])
            s = self.pointer(s["$ref"])
        return s

    def pointer(self, ref: str):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise GrammarError(f"$ref {ref!r} is not supported: only local references (#/$defs/...) are")
        node = self.root_schema
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise GrammarError(f"$ref {ref!r} points to nothing in the schema")
        return node

    def ref(self, ref: str) -> Ref:
        hit = self.refs.get(ref)
        if hit is not None:
            return hit
        target = self.pointer(ref)
        name = self.g.fresh("def")
        self.refs[ref] = Ref(name)
        self.g.rules[name] = EMPTY
        self.g.rules[name] = self.schema(target, ref)
        return self.refs[ref]


def infer_types(s: dict) -> list[str]:
    if any(k in s for k in ("properties", "additionalProperties", "required")):
        return ["object"]
    if any(k in s for k in ("items", "prefixItems", "minItems", "maxItems")):
        return ["array"]
    if any(k in s for k in ("minLength", "maxLength", "pattern", "format")):
        return ["string"]
    if any(k in s for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        return ["integer"]
    return list(TYPES)


def merge_siblings(siblings: dict, branch, path: str):
    """A branch of anyOf/oneOf with the keywords written beside the anyOf (they apply to every branch)."""
    if not siblings:
        return branch
    if not isinstance(branch, dict):
        return branch if branch is False else dict(siblings)
    return merge_all_of([siblings, branch], path)


def merge_all_of(parts: list, path: str) -> dict:
    """The schemas of an allOf as one: properties merged, required joined; any other keyword must agree."""
    merged: dict = {}
    for part in parts:
        if part is True:
            continue
        if not isinstance(part, dict):
            raise GrammarError(f"allOf at {path} holds a false or non-object schema")
        for key, value in part.items():
            if key in ANNOTATIONS or key in ("$defs", "definitions"):
                continue
            if key == "properties":
                props = merged.setdefault("properties", {})
                for name, sub in value.items():
                    if name in props and props[name] != sub:
                        raise GrammarError(f"allOf at {path} gives property {name!r} two different schemas")
                    props[name] = sub
            elif key == "required":
                merged["required"] = sorted(set(merged.get("required", [])) | set(value))
            elif key in merged and merged[key] != value:
                raise GrammarError(f"allOf at {path} combines two different {key!r}: only objects' properties "
                                   "and required can be merged")
            else:
                merged[key] = value
    return merged


def count_bounds(s: dict, low: str, high: str, path: str) -> tuple[int, int | None]:
    lo, hi = s.get(low, 0), s.get(high)
    for name, v in ((low, lo), (high, hi)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > MAX_COUNT):
            raise GrammarError(f"{name} at {path} must be an integer from 0 to {MAX_COUNT}")
    if hi is not None and hi < lo:
        raise GrammarError(f"{low} {lo} > {high} {hi} at {path}: no value can match")
    return lo, hi


def integer_bounds(s: dict, path: str) -> tuple[int | None, int | None]:
    def whole(name: str, v, up: bool) -> int:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise GrammarError(f"{name} at {path} must be a number")
        return int(-(-v // 1)) if up else int(v // 1)

    lo = whole("minimum", s["minimum"], True) if "minimum" in s else None
    hi = whole("maximum", s["maximum"], False) if "maximum" in s else None
    if "exclusiveMinimum" in s:
        v = whole("exclusiveMinimum", s["exclusiveMinimum"], False) + 1
        lo = v if lo is None else max(lo, v)
    if "exclusiveMaximum" in s:
        v = -whole("exclusiveMaximum", -s["exclusiveMaximum"], False) - 1
        hi = v if hi is None else min(hi, v)
    if lo is not None and hi is not None and lo > hi:
        raise GrammarError(f"minimum {lo} > maximum {hi} at {path}: no integer can match")
    return lo, hi


def _same_length(a: str, b: str):
    """Decimal strings of len(a) == len(b) digits between a and b (numeric order = string order here)."""
    if not a:
        return EMPTY
    if a[0] == b[0]:
        return seq(literal(a[0]), _same_length(a[1:], b[1:]))
    n = len(a) - 1
    if a[1:] == "0" * n and b[1:] == "9" * n:
        return seq(ByteSet(((ord(a[0]), ord(b[0])),)), Repeat(DIGIT, n, n))
    options = [seq(literal(a[0]), _same_length(a[1:], "9" * n))]
    if ord(a[0]) + 1 <= ord(b[0]) - 1:
        options.append(seq(ByteSet(((ord(a[0]) + 1, ord(b[0]) - 1),)), Repeat(DIGIT, n, n)))
    options.append(seq(literal(b[0]), _same_length("0" * n, b[1:])))
    return alt(*options)


def _natural_range(lo: int, hi: int | None):
    """Canonical decimals (no leading zeros) of the integers lo..hi (hi None: unbounded), lo >= 0."""
    a = str(lo)
    options = []
    top = len(str(hi)) if hi is not None else len(a)
    for n in range(len(a), top + 1):
        first = a if n == len(a) else "1" + "0" * (n - 1)
        last = str(hi) if hi is not None and n == len(str(hi)) else "9" * n
        options.append(_same_length(first, last))
    if hi is None:
        options.append(seq(NONZERO, Repeat(DIGIT, len(a), None)))
    return alt(*options)


def integer_range(lo: int | None, hi: int | None):
    """The JSON integers between lo and hi (None: unbounded), as a grammar expression."""
    options = []
    if lo is None or lo < 0:  # negative numbers -1 .. lo
        neg_hi = None if lo is None else -lo
        neg_lo = 1 if hi is None or hi >= 0 else -hi
        options.append(seq(literal("-"), _natural_range(neg_lo, neg_hi)))
    if hi is None or hi >= 0:
        options.append(_natural_range(max(lo or 0, 0), hi))
    return alt(*options)


def parse_schema(schema):
    """``schema`` as a Python value: a dict or bool as it is, JSON text parsed (a GrammarError when it is not JSON)."""
    if isinstance(schema, (str, bytes)):
        try:
            return json.loads(schema)
        except json.JSONDecodeError as exc:
            raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
    return schema


def json_schema_grammar(schema, max_whitespace: int = 0) -> Grammar:
    """The grammar of the JSON texts that ``schema`` (a dict, a bool, or JSON text) accepts."""
    schema = parse_schema(schema)
    try:
        return SchemaCompiler(schema, max_whitespace).compile()
    except GrammarError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError) as exc:
        # A keyword with a value of the wrong kind ("required": 5, "pattern": [1]): say so in one line.
        raise GrammarError(f"the JSON schema is malformed ({type(exc).__name__}: {exc}): check the keywords' "
                           "values") from None


def json_object_grammar(max_whitespace: int = 0) -> Grammar:
    """Any JSON object (OpenAI's ``response_format={"type": "json_object"}``)."""
    return SchemaCompiler({"type": "object"}, max_whitespace).compile()
