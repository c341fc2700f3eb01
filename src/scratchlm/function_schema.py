"""JSON schemas from Python functions: a signature, its type hints and its docstring become the schema of a
tool's arguments (``scratchlm.tools.Tool.from_function``), as OpenAI's and LangChain's function tools describe them.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Iterable

from scratchlm.errors import ConfigError


class ToolError(ConfigError):
    """A tool spec, tool_choice or tool call that cannot be used."""


_ARGS_HEADER = re.compile(r"^(Args|Arguments|Parameters):\s*$")
_SECTION = re.compile(r"^[A-Z][A-Za-z ]*:\s*$")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(the first paragraph, {argument: description}) from a Google-style or reST docstring."""
    lines = doc.splitlines()
    summary = " ".join(ln.strip() for ln in _first_paragraph(lines))
    args: dict[str, str] = {}
    current, in_args = None, False
    for ln in lines:
        stripped = ln.strip()
        m = re.match(r"^:param\s+(?:[^:]*\s)?(\w+):\s*(.*)$", stripped)
        if m:
            current, args[m.group(1)] = m.group(1), m.group(2)
            continue
        if _ARGS_HEADER.match(stripped):
            in_args, current = True, None
            continue
        if in_args:
            if _SECTION.match(stripped) and not ln.startswith((" ", "\t")):
                in_args = False
                continue
            m = re.match(r"^(\w+)\s*(?:\([^)]*\))?:\s*(.*)$", stripped)
            if m:
                current, args[m.group(1)] = m.group(1), m.group(2)
            elif current and stripped:
                args[current] = f"{args[current]} {stripped}".strip()
        elif current and stripped and not stripped.startswith(":"):
            args[current] = f"{args[current]} {stripped}".strip()
        else:
            current = None if not stripped else current
    return summary, args


def _first_paragraph(lines: list[str]) -> list[str]:
    out = []
    for ln in lines:
        if not ln.strip() or _ARGS_HEADER.match(ln.strip()) or ln.strip().startswith(":param"):
            break
        out.append(ln)
    return out


def schema_from_function(fn: Callable, descriptions: dict[str, str] | None = None) -> dict:
    """The JSON schema of ``fn``'s keyword arguments: a parameter without a default is required."""
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as exc:  # a hint naming something undefined
        raise ToolError(f"cannot read the type hints of {getattr(fn, '__name__', fn)!r}: {exc}") from None
    props, required = {}, []
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ToolError(f"{fn.__name__}: *{name} cannot be described as a JSON schema; name each argument")
        if p.kind == p.POSITIONAL_ONLY:
            raise ToolError(f"{fn.__name__}: argument {name!r} is positional-only; tools take keyword arguments")
        prop = type_schema(hints.get(name, inspect.Parameter.empty))
        if descriptions and name in descriptions and "description" not in prop:
            prop = {**prop, "description": descriptions[name]}
        if p.default is inspect.Parameter.empty:
            required.append(name)
        elif _json_default(p.default):
            prop = {**prop, "default": p.default}
        props[name] = prop
    schema = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    defs: dict = {}
    _lift_defs(props, defs)  # pydantic models bring their $defs (#/$defs/... refs): one set at the top
    if defs:
        schema["$defs"] = defs
    return schema


def _lift_defs(node, defs: dict) -> None:
    if isinstance(node, list):
        for item in node:
            _lift_defs(item, defs)
    elif isinstance(node, dict):
        defs.update(node.pop("$defs", {}))
        for key, value in node.items():
            if key not in ("const", "enum", "default", "examples"):
                _lift_defs(value, defs)
    for value in list(defs.values()):  # a model's own defs may hold more
        if isinstance(value, dict) and "$defs" in value:
            _lift_defs(value, defs)


def _json_default(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def type_schema(hint) -> dict:
    """The JSON schema of one Python type hint (str, int, float, bool, None, list, tuple, dict, Literal,
    Optional/Union, Enum, Annotated[T, "description"], pydantic models); no hint means any value."""
    if hint is inspect.Parameter.empty or hint is typing.Any:
        return {}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        base = type_schema(args[0])
        text = next((a for a in args[1:] if isinstance(a, str)), None)
        return {**base, "description": text} if text else base
    simple = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
    if hint in simple:
        return {"type": simple[hint]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [type_schema(a) for a in args]
        return options[0] if len(options) == 1 else {"anyOf": options}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [m.value for m in hint]}
    if hint in (list, tuple, set, frozenset) or origin in (list, set, frozenset, Iterable, typing.Sequence) or (
            origin is not None and getattr(origin, "__name__", "") in ("Sequence", "Iterable")):
        return {"type": "array", "items": type_schema(args[0])} if args else {"type": "array"}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": type_schema(args[0])}
        return {"type": "array", "prefixItems": [type_schema(a) for a in args], "items": False}
    if hint is dict or origin is dict:
        return {"type": "object", "additionalProperties": type_schema(args[1])} if args else {"type": "object"}
    if hasattr(hint, "model_json_schema"):  # a pydantic model
        return hint.model_json_schema(ref_template="#/$defs/{model}")
    raise ToolError(f"type hint {hint!r} has no JSON schema here: use str, int, float, bool, list, dict, Literal, "
                    "an Enum or a pydantic model")
