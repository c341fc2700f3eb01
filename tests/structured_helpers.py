"""Schemas for the structured-output tests: a fixed set, and a seeded generator of random ones."""

from __future__ import annotations

import random

# Strings that need escaping or are not ASCII: quotes, backslashes, controls, accents, an emoji (4 bytes).
AWKWARD = ['say "hi"', "back\\slash", "tab\there", "new\nline", "ünïcödé", "日本", "😀 ok", ""]

FIXED = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "age"]},
    "weather_call": {"type": "object", "properties": {
        "tool": {"const": "get_weather"},
        "arguments": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}},
        "required": ["tool", "arguments"]},
    "tree": {"$defs": {"node": {"type": "object", "properties": {
        "label": {"type": "string", "maxLength": 12},
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
        "required": ["label", "children"]}}, "$ref": "#/$defs/node"},
    "mixed": {"type": "object", "properties": {
        "id": {"type": "string", "format": "uuid"}, "when": {"type": "string", "format": "date"},
        "score": {"type": "number"}, "flag": {"type": ["boolean", "null"]},
        "choice": {"anyOf": [{"type": "integer"}, {"enum": AWKWARD}]},
        "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string", "maxLength": 5}]}},
        "required": ["id", "score", "choice"]},
    "code": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"},
                                              "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
             "required": ["sku", "qty"], "additionalProperties": False},
    "list": {"type": "array", "items": {"type": "object", "properties": {
        "k": {"enum": AWKWARD}, "v": {"type": "integer", "minimum": -5, "maximum": 5}}, "required": ["k"]},
        "minItems": 1, "maxItems": 3},
}


def random_schema(rng: random.Random, depth: int = 0, defs: dict | None = None) -> dict:
    """A random schema whose values stay short (bounded strings, arrays and integers), so that a random model
    completes them within a few hundred bytes: nested objects, arrays, enums, refs, optional fields, escapes."""
    kinds = ["string", "integer", "enum", "boolean", "null", "const", "anyOf"]
    if depth < 2:
        kinds += ["object", "array", "object"]
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 6), "minLength": 0}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 200)}
    if kind == "enum":
        return {"enum": rng.sample(AWKWARD + [1, 2.5, None, True, ["x"], {"a": "b"}], rng.randint(1, 4))}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    if kind == "const":
        return {"const": rng.choice(AWKWARD)}
    if kind == "anyOf":
        return {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 0, "maximum": 9},
                          {"type": "string", "maxLength": 3}][: rng.randint(2, 3)]}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1, defs), "maxItems": rng.randint(0, 3)}
    props = {f"p{i}_{rng.choice(AWKWARD)[:3]}": random_schema(rng, depth + 1, defs) for i in range(rng.randint(1, 4))}
    schema = {"type": "object", "properties": props, "required": rng.sample(sorted(props), rng.randint(0, len(props)))}
    if defs is not None and rng.random() < 0.5:
        name = f"d{len(defs)}"
        defs[name] = schema
        return {"$ref": f"#/$defs/{name}"}
    return schema


def random_schemas(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        defs: dict = {}
        root = random_schema(rng, 0, defs)
        if defs:
            root = {"$defs": defs, **root}
        out.append(root)
    return out
