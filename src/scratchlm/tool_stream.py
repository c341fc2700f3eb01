"""Reading a generic-format reply (scratchlm.tools) while it is being written: what is known so far of its answer
text or of its calls, and the OpenAI stream deltas that carry it.

OpenAI streams a call as deltas of ``choices[i].delta.tool_calls``: the first for a call carries its ``index``,
``id``, ``type`` and ``function.name`` (with ``arguments: ""``); later ones carry the same ``index`` and only an
argument fragment. The fragments joined are the call's ``arguments`` string. An answer (``{"response": "..."}``)
streams as ``delta.content``, the JSON string's text decoded as it completes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from scratchlm.tools import new_call_id

KEYS = ("response", "tool_call", "tool_calls")


class _Incomplete(Exception):
    """The text ends before the part being read does."""


@dataclass
class ScannedCall:
    name: str
    arguments: str = ""  # the raw JSON text of the arguments read so far
    done: bool = False


@dataclass
class Scan:
    """What a (possibly partial) generic reply says so far."""

    kind: str | None = None  # "response", "tool_call" or "tool_calls" once the key is read
    content: str = ""  # the response: a string's decoded text, or a JSON value's text
    calls: list[ScannedCall] = field(default_factory=list)
    complete: bool = False  # the whole object was read, and nothing but whitespace follows


class _Reader:
    def __init__(self, text: str):
        self.text, self.i = text, 0

    def ws(self) -> None:
        while self.i < len(self.text) and self.text[self.i] in " \t\r\n":
            self.i += 1

    def expect(self, char: str) -> None:
        self.ws()
        if self.i >= len(self.text):
            raise _Incomplete
        if self.text[self.i] != char:
            raise ValueError(f"expected {char!r} at {self.i}")
        self.i += 1

    def peek(self) -> str:
        self.ws()
        if self.i >= len(self.text):
            raise _Incomplete
        return self.text[self.i]

    def string(self) -> str:
        self.ws()
        end = string_end(self.text, self.i)
        if end is None:
            raise _Incomplete
        value = json.loads(self.text[self.i:end])
        self.i = end
        return value

    def value_span(self) -> tuple[int, int | None]:
        """(start, end) of the JSON value here; end None while it is incomplete."""
        self.ws()
        if self.i >= len(self.text):
            raise _Incomplete
        start = self.i
        end = value_end(self.text, start)
        if end is not None:
            self.i = end
        return start, end


def string_end(text: str, i: int) -> int | None:
    """The index after the JSON string that opens at ``text[i]``, or None when it is not closed yet."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
        elif text[j] == '"':
            return j + 1
        else:
            j += 1
    return None


def value_end(text: str, i: int) -> int | None:
    """The index after the JSON value that starts at ``text[i]``, or None when it is not finished yet (a number
    at the very end may still grow, so it counts as unfinished)."""
    c = text[i]
    if c == '"':
        return string_end(text, i)
    if c in "{[":
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == '"':
                end = string_end(text, j)
                if end is None:
                    return None
                j = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(text) and text[j] not in ",}] \t\r\n":
        j += 1
    return j if j < len(text) else None


def decode_partial_string(body: str) -> str:
    """The text of a JSON string's content read so far, leaving out an escape that is not complete yet
    (``\\u00`` or the first half of a surrogate pair)."""
    for cut in range(0, min(len(body), 12) + 1):
        try:
            text = json.loads('"' + body[:len(body) - cut] + '"')
        except json.JSONDecodeError:
            continue
        if not (text and "\ud800" <= text[-1] <= "\udbff"):  # a pair's first half waits for its second
            return text
    return ""


def scan_generic(text: str) -> Scan:
    """Read as much of a generic-format reply as ``text`` holds."""
    scan, r = Scan(), _Reader(text)
    try:
        r.expect("{")
        key = r.string()
        if key not in KEYS:
            return scan
        scan.kind = key
        r.expect(":")
        if key == "response":
            start, end = r.value_span()
            if text[start] == '"':
                body = text[start + 1:end - 1] if end is not None else text[start + 1:]
                scan.content = decode_partial_string(body) if end is None else json.loads(text[start:end])
            else:
                scan.content = text[start:end] if end is not None else text[start:]
            if end is None:
                raise _Incomplete
        elif key == "tool_call":
            _call(r, scan)
        else:
            r.expect("[")
            while True:
                _call(r, scan)
                if r.peek() == "]":
                    r.i += 1
                    break
                r.expect(",")
        r.expect("}")
        r.ws()
        scan.complete = r.i == len(text)
    except (_Incomplete, ValueError, json.JSONDecodeError):
        pass
    return scan


def _call(r: _Reader, scan: Scan) -> None:
    """One ``{"name": ..., "arguments": ...}`` (keys in that order, as the grammar writes them)."""
    r.expect("{")
    if r.string() != "name":
        raise ValueError("a call starts with its name")
    r.expect(":")
    name = r.string()
    r.expect(",")
    if r.string() != "arguments":
        raise ValueError("a call's name is followed by its arguments")
    r.expect(":")
    call = ScannedCall(name)
    scan.calls.append(call)
    start, end = r.value_span()
    call.arguments = r.text[start:end] if end is not None else r.text[start:]
    if end is None:
        raise _Incomplete
    r.expect("}")
    call.done = True


class ToolStream:
    """Turns the growing text of one generic-format reply into OpenAI deltas. ``feed(text)`` with each new piece
    returns the deltas it releases; the call ids are made here and kept in ``ids`` for the final message."""

    def __init__(self):
        self.text = ""
        self.sent_content = 0
        self.sent_args: list[int] = []  # per call: argument characters sent
        self.ids: list[str] = []

    def feed(self, piece: str) -> list[dict]:
        self.text += piece
        scan = scan_generic(self.text)
        deltas = []
        if scan.kind == "response" and len(scan.content) > self.sent_content:
            deltas.append({"content": scan.content[self.sent_content:]})
            self.sent_content = len(scan.content)
        for k, call in enumerate(scan.calls):
            if k == len(self.ids):
                self.ids.append(new_call_id())
                self.sent_args.append(0)
                deltas.append({"tool_calls": [{"index": k, "id": self.ids[k], "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})
            if len(call.arguments) > self.sent_args[k]:
                deltas.append({"tool_calls": [{"index": k,
                                               "function": {"arguments": call.arguments[self.sent_args[k]:]}}]})
                self.sent_args[k] = len(call.arguments)
        return deltas

    def scan(self) -> Scan:
        return scan_generic(self.text)
