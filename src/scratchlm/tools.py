"""Tools (function calling): tool specs, JSON schemas from Python functions, the format a model writes its calls
in, and the parsing of that output back into OpenAI's ``tool_calls``.

    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
        '''The current weather in a city.

        Args:
            city: the city's name, e.g. Paris
        '''
    message = llm.chat("Weather in Paris?", tools=[get_weather], tool_choice="auto")
    # {"role": "assistant", "content": None,
    #  "tool_calls": [{"id": "call_...", "type": "function",
    #                  "function": {"name": "get_weather", "arguments": "{\\"city\\":\\"Paris\\"}"}}]}
    messages += [message, *run_tool_calls(message, [get_weather])]   # the tool's answers, as role "tool"

The default output format is llama.cpp's "generic" one: the whole reply is one JSON object,
``{"tool_call": {"name": ..., "arguments": {...}}}`` (``{"tool_calls": [...]}`` when calls may run in parallel)
or ``{"response": "..."}``, and a grammar built from the tools' parameter schemas constrains it, so a call always
names an offered tool and its arguments always validate. ``tool_format="hermes"`` is the ``<tool_call>`` prose
format (free text; a ``<tool_call>`` tag starts a constrained call), kept for comparison:
benchmarks/function_calling.py measures both (docs/tools.md).
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from scratchlm.function_schema import ToolError, parse_docstring, schema_from_function

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
MODES = ("none", "auto", "required")
FORMATS = ("generic", "hermes")
MAX_PARALLEL_CALLS = 8  # calls in one reply: a greedy small model would otherwise repeat one until the budget ends
DATA_KEYS = ("const", "enum", "default", "examples")  # values there are data, not schemas: no $ref to move


# ---- tool specs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tool:
    """One function the model may call: a name, a description, and a JSON schema of its arguments
    (``None``: it takes none). ``function`` is the Python callable, when there is one."""

    name: str
    description: str = ""
    parameters: dict | None = None
    strict: bool = False
    function: Callable | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not TOOL_NAME.match(self.name):
            raise ToolError(f"tool name {self.name!r} is not valid: use 1-64 letters, digits, '_' or '-'")
        if self.parameters is not None and not isinstance(self.parameters, dict):
            raise ToolError(f"tool {self.name!r}: parameters must be a JSON schema object")

    @property
    def schema(self) -> dict:
        """The JSON schema the call's arguments follow (an empty object for a tool without parameters)."""
        return self.parameters if self.parameters is not None else NO_PARAMETERS

    @classmethod
    def from_function(cls, fn: Callable, name: str | None = None, description: str | None = None) -> Tool:
        """A tool from a Python function: its name, its docstring's first paragraph, and a schema built from
        its signature and type hints (parameter descriptions from a Google-style ``Args:`` section or
        ``:param x:`` lines)."""
        doc = inspect.getdoc(fn) or ""
        summary, arg_docs = parse_docstring(doc)
        return cls(name or fn.__name__, description if description is not None else summary,
                   schema_from_function(fn, arg_docs), function=fn)

    @classmethod
    def from_openai(cls, spec: dict, index: int = 0) -> Tool:
        """A tool from OpenAI's ``{"type": "function", "function": {"name", "description", "parameters",
        "strict"}}`` (the bare inner ``function`` object is accepted too)."""
        if not isinstance(spec, dict):
            raise ToolError(f"tools[{index}] must be an object like {{'type': 'function', 'function': {{...}}}}")
        if spec.get("type", "function") != "function":
            raise ToolError(f"tools[{index}] has type {spec.get('type')!r}: only 'function' tools exist here")
        spec = spec.get("function", spec)
        if not isinstance(spec, dict) or not spec.get("name"):
            raise ToolError(f"tools[{index}] has no function name: give {{'function': {{'name': ...}}}}")
        return cls(spec["name"], spec.get("description") or "", spec.get("parameters"), bool(spec.get("strict")))

    def to_openai(self) -> dict:
        function = {"name": self.name, "description": self.description, "parameters": self.schema}
        if self.strict:
            function["strict"] = True
        return {"type": "function", "function": function}

    def __call__(self, arguments: str | dict):
        """Run the Python function with the call's arguments (JSON text or a dict)."""
        if self.function is None:
            raise ToolError(f"tool {self.name!r} has no Python function to run")
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
        return self.function(**args)


def as_tools(tools: Iterable) -> list[Tool]:
    """Tools from ``Tool`` objects, OpenAI tool dicts or Python functions; names must be unique."""
    out = []
    for i, t in enumerate(tools or []):
        if isinstance(t, Tool):
            out.append(t)
        elif isinstance(t, dict):
            out.append(Tool.from_openai(t, i))
        elif callable(t):
            out.append(Tool.from_function(t))
        else:
            raise ToolError(f"tools[{i}] is a {type(t).__name__}: give a Tool, an OpenAI tool dict or a function")
    names = [t.name for t in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ToolError(f"tool names must be unique; given more than once: {', '.join(twice)}")
    return out


# ---- tool_choice ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolPlan:
    """What the model may do in this reply: ``mode`` none (answer only), auto (answer or call) or required (call),
    ``tools`` the ones it may call, ``parallel`` whether it may call several."""

    tools: tuple[Tool, ...]
    mode: str
    parallel: bool = True


def plan_tools(tools: Iterable, tool_choice=None, parallel_tool_calls: bool | None = None) -> ToolPlan:
    """Resolve OpenAI's ``tool_choice``: "none", "auto" (the default with tools), "required", a named function
    ``{"type": "function", "function": {"name": ...}}`` (or, in Python, the name alone), or
    ``{"type": "allowed_tools", "allowed_tools": {"mode": "auto"|"required", "tools": [...]}}``."""
    offered = as_tools(tools)
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    if tool_choice is None:
        tool_choice = "auto" if offered else "none"
    if isinstance(tool_choice, str) and tool_choice in MODES:
        mode, chosen = tool_choice, offered
    elif isinstance(tool_choice, str):
        mode, chosen = "required", _pick(offered, [tool_choice])
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "allowed_tools":
        spec = tool_choice.get("allowed_tools", tool_choice)
        mode = spec.get("mode", "auto") if isinstance(spec, dict) else None
        if mode not in ("auto", "required") or not isinstance(spec.get("tools"), list):
            raise ToolError('tool_choice allowed_tools needs {"mode": "auto" or "required", "tools": [...]}')
        chosen = _pick(offered, [_choice_name(t) for t in spec["tools"]])
    elif isinstance(tool_choice, dict):
        mode, chosen = "required", _pick(offered, [_choice_name(tool_choice)])
    else:
        raise ToolError('tool_choice must be "none", "auto", "required", a function '
                        '{"type": "function", "function": {"name": ...}} or allowed_tools')
    if mode != "none" and not chosen:
        raise ToolError(f'tool_choice "{mode}" needs tools: the request offers none')
    return ToolPlan(tuple(chosen) if mode != "none" else (), mode, parallel)


def _choice_name(spec) -> str:
    if isinstance(spec, dict):
        inner = spec.get("function", spec)
        if isinstance(inner, dict) and isinstance(inner.get("name"), str):
            return inner["name"]
    raise ToolError('a tool named in tool_choice must look like {"type": "function", "function": {"name": ...}}')


def _pick(offered: list[Tool], names: list[str]) -> list[Tool]:
    by_name = {t.name: t for t in offered}
    for n in names:
        if n not in by_name:
            raise ToolError(f"tool_choice names {n!r}, which is not among the tools offered "
                            f"({', '.join(by_name) or 'none'})")
    return [by_name[n] for n in dict.fromkeys(names)]


# ---- the generic output format --------------------------------------------------------------------------
def _move_refs(schema, base: str):
    """A copy of ``schema`` whose local ``$ref``s point into it at its new place ``base`` (e.g. #/$defs/t0)."""
    if isinstance(schema, list):
        return [_move_refs(s, base) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "$ref" and isinstance(v, str) and v.startswith("#"):
            out[k] = base + v[1:]
        elif k in DATA_KEYS:
            out[k] = copy.deepcopy(v)
        elif k == "properties" and isinstance(v, dict):  # property names are not keywords
            out[k] = {name: _move_refs(s, base) for name, s in v.items()}
        else:
            out[k] = _move_refs(v, base)
    return out


def output_schema(plan: ToolPlan, response_schema: dict | bool | None = None) -> dict:
    """The JSON schema of a whole reply in the generic format. Calls: ``{"tool_call": {"name", "arguments"}}``, or
    ``{"tool_calls": [...]}`` when parallel calls are allowed; answers (mode auto): ``{"response": ...}``, a string
    or a value of ``response_schema`` (a response_format's schema). Each tool's parameter schema is placed under
    ``$defs`` so that its own ``$ref``s still resolve."""
    defs, branches = {}, []
    calls = []
    for i, tool in enumerate(plan.tools):
        defs[f"t{i}"] = _move_refs(tool.schema, f"#/$defs/t{i}")
        calls.append({"type": "object", "properties": {"name": {"const": tool.name},
                                                       "arguments": {"$ref": f"#/$defs/t{i}"}},
                      "required": ["name", "arguments"], "additionalProperties": False})
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if plan.mode in ("auto", "required") and calls:
        if plan.parallel:
            value, key = {"type": "array", "items": call, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}, "tool_calls"
        else:
            value, key = call, "tool_call"
        branches.append(_single(key, value))
    if plan.mode != "required":
        if response_schema is None:
            answer = {"type": "string"}
        else:
            defs["response"] = _move_refs(response_schema, "#/$defs/response")
            answer = {"$ref": "#/$defs/response"}
        branches.append(_single("response", answer))
    schema = branches[0] if len(branches) == 1 else {"anyOf": branches}
    return {**schema, "$defs": defs} if defs else schema


def _single(key: str, value: dict) -> dict:
    return {"type": "object", "properties": {key: value}, "required": [key], "additionalProperties": False}


def call_schema(plan: ToolPlan) -> dict:
    """The schema of one call ``{"name", "arguments"}`` (the body of a hermes ``<tool_call>`` tag)."""
    whole = output_schema(ToolPlan(plan.tools, "required", False))
    return {**whole["properties"]["tool_call"], "$defs": whole["$defs"]}


def output_constraint(plan: ToolPlan, response_schema=None):
    """The compiled constraint of a reply in the generic format (cached by its schema, like any JSON schema)."""
    from scratchlm.structured import json_schema_constraint

    return json_schema_constraint(output_schema(plan, response_schema))


def check_tools(tools: list[Tool]) -> None:
    """Compile each tool's parameter schema alone, so that a bad one is reported with the tool's name."""
    from scratchlm.structured import GrammarError, json_schema_constraint

    for tool in tools:
        try:
            json_schema_constraint(tool.schema)
        except GrammarError as exc:
            raise ToolError(f"tool {tool.name!r}: its parameters schema cannot be used: {exc}") from None


# ---- prompts --------------------------------------------------------------------------------------------------
GENERIC_INSTRUCTIONS = {
    "auto": 'Reply with one JSON object: {{"tool_call": {{"name": <tool name>, "arguments": <arguments>}}}} to call '
            'a tool, or {{"response": <your answer>}} to answer directly.',
    "required": 'Reply with one JSON object that calls a tool: {{"tool_call": {{"name": <tool name>, '
                '"arguments": <arguments>}}}}.',
}
HERMES_INSTRUCTIONS = (
    "You may call one or more functions to assist with the user query. For each call, return a JSON object with "
    "the function name and arguments within <tool_call></tool_call> tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def tools_prompt(plan: ToolPlan, tool_format: str = "generic") -> str:
    """The system text that lists the tools and says how to call them (for templates that do not know tools)."""
    listing = "\n".join(json.dumps(t.to_openai()["function"], ensure_ascii=False) for t in plan.tools)
    if tool_format == "hermes":
        return f"You have these tools:\n<tools>\n{listing}\n</tools>\n\n{HERMES_INSTRUCTIONS}"
    text = GENERIC_INSTRUCTIONS[plan.mode].format()
    if plan.parallel:
        text = text.replace('{"tool_call": {"name": <tool name>, "arguments": <arguments>}}',
                            '{"tool_calls": [{"name": <tool name>, "arguments": <arguments>}, ...]}')
    return f"You have these tools:\n{listing}\n\n{text}"


def template_knows_tools(source: str) -> bool:
    """Whether a chat template renders a ``tools`` list itself (HF's convention for tool-aware templates)."""
    return bool(re.search(r"\btools\b", source))


def history_as_text(messages: list[dict], tool_format: str = "generic") -> list[dict]:
    """Messages a plain template can render, null contents as "". Generic format: an assistant turn's calls as a
    sentence, ``I called get_weather with {"city":"Paris"}.``, and a tool result as a user turn, ``get_weather
    returned: ...``. Measured on SmolLM2-135M (docs/tools.md): with its past calls shown in the reply format the
    model copies the last call at every later step and an agent never ends; shown as prose it reads the result and
    answers. Hermes format: calls in ``<tool_call>`` tags and results in ``<tool_response>`` tags, its own layout."""
    names = {}
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None) or []
        if m.get("role") == "assistant" and calls:
            parsed = []
            for c in calls:
                fn = c.get("function", c)
                names[c.get("id")] = fn.get("name")
                args = fn.get("arguments", {})
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except json.JSONDecodeError:
                    pass
                parsed.append({"name": fn.get("name"), "arguments": args})
            m["content"] = ((m.get("content") or "") + ("\n" if m.get("content") else "")
                            + calls_text(parsed, tool_format))
        elif m.get("role") == "tool":
            name = m.pop("name", None) or names.get(m.get("tool_call_id")) or "the tool"
            result = m.get("content") or ""
            if tool_format == "hermes":
                m["content"] = f"<tool_response>\n{result}\n</tool_response>"
            else:
                m = {"role": "user", "content": f"{name} returned: {result}"}
        m.pop("tool_call_id", None)
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


def calls_text(calls: list[dict], tool_format: str = "generic") -> str:
    """Past calls ``[{"name", "arguments"}]`` as the conversation shows them (see history_as_text)."""
    dump = lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":"))  # noqa: E731
    if tool_format == "hermes":
        return "\n".join(f"<tool_call>\n{dump(c)}\n</tool_call>" for c in calls)
    return " ".join(f"I called {c['name']} with {dump(c['arguments'])}." for c in calls)


def with_tools_prompt(messages: list[dict], plan: ToolPlan, tool_format: str = "generic") -> list[dict]:
    """The conversation with the tools' system text added to its system message (or a new one first)."""
    if plan.mode == "none" or not plan.tools:
        return list(messages)
    text = tools_prompt(plan, tool_format)
    if messages and messages[0].get("role") in ("system", "developer"):
        first = dict(messages[0], role="system", content=f"{messages[0].get('content') or ''}\n\n{text}".strip())
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


# ---- parsing replies -------------------------------------------------------------------------------------------
def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_call(name: str, arguments: str, call_id: str | None = None) -> dict:
    """One entry of OpenAI's ``message.tool_calls``."""
    return {"id": call_id or new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def parse_reply(text: str, tool_format: str = "generic", json_response: bool = False) -> tuple[str | None, list]:
    """(content, tool_calls) of a finished reply. A generic reply that is not whole JSON (cut by the token budget)
    is returned as content with no calls. ``json_response``: the response is a JSON value (response_format) and
    its text is the content."""
    if tool_format == "hermes":
        return parse_hermes(text)
    from scratchlm.tool_stream import scan_generic  # the scanner is shared with streaming

    scan = scan_generic(text)
    if not scan.complete:
        return text, []
    if scan.kind == "response":
        return scan.content, []
    return None, [tool_call(c.name, c.arguments) for c in scan.calls]


_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse_hermes(text: str) -> tuple[str | None, list]:
    """(content, tool_calls) of a reply in the ``<tool_call>`` format: each tag holds ``{"name", "arguments"}``."""
    calls = []
    for m in _HERMES_CALL.finditer(text):
        try:
            value = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            args = value.get("arguments", {})
            calls.append(tool_call(value["name"], json.dumps(args, ensure_ascii=False, separators=(",", ":"))))
    content = _HERMES_CALL.sub("", text).strip() if calls else text
    return content or None, calls


def assistant_message(content: str | None, calls: list) -> dict:
    """The reply as an OpenAI assistant message (append it to the conversation as it is)."""
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message


def run_tool_calls(message: dict, tools: Iterable) -> list[dict]:
    """Run each call of an assistant message with the matching Python function; the results as ``tool``
    messages (a failing call answers with its error text, so that the model can see it)."""
    by_name = {t.name: t for t in as_tools(tools)}
    out = []
    for call in message.get("tool_calls") or []:
        name = call["function"]["name"]
        try:
            if name not in by_name:
                raise ToolError(f"no tool named {name!r}")
            result = by_name[name](call["function"]["arguments"])
            content = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
        except Exception as exc:  # reported to the model, which may correct the call
            content = f"error: {type(exc).__name__}: {exc}"
        out.append({"role": "tool", "tool_call_id": call["id"], "name": name, "content": content})
    return out


# ---- one chat turn with tools (LLM.chat) ---------------------------------------------------------------------
def response_schema_of(response_format) -> dict | None:
    """The schema a response_format asks the answer to follow (None: plain text)."""
    if response_format is None:
        return None
    from scratchlm.structured import response_format_constraint

    response_format_constraint(response_format)  # checks its shape and compiles the schema alone
    kind = response_format["type"]
    if kind == "json_object":
        return {"type": "object"}
    return response_format["json_schema"]["schema"] if kind == "json_schema" else None


def render_prompt(template, messages: list[dict], plan: ToolPlan, tool_format: str = "generic") -> str:
    """The prompt text: a template that knows tools gets them as ``tools`` (and the conversation as it is); any
    other gets the tools and the format in its system message and the history written out (history_as_text)."""
    if template_knows_tools(template.source):
        listed = [t.to_openai() for t in plan.tools] or None
        instructions = ToolPlan((), plan.mode, plan.parallel)  # only the format line: the template lists the tools
        text = tools_prompt(instructions, tool_format).split("\n\n", 1)[-1] if plan.mode != "none" else ""
        messages = [{"role": "system", "content": text}, *messages] if text else messages
        return template.render(messages, tools=listed)
    return template.render(with_tools_prompt(messages, plan, tool_format), tool_format=tool_format)


def chat_with_tools(llm, messages: list[dict], tools, tool_choice=None, parallel_tool_calls: bool | None = None,
                    tool_format: str = "generic", **sampling) -> dict:
    """One assistant turn that may call tools: the reply as an OpenAI assistant message
    ``{"role": "assistant", "content": ..., "tool_calls": [...]}`` (``tool_calls`` only when there are calls).
    ``sampling`` may hold a ``response_format`` for the answer; generic replies are constrained whole."""
    if tool_format not in FORMATS:
        raise ToolError(f"unknown tool_format {tool_format!r}: use {' or '.join(FORMATS)}")
    plan = plan_tools(tools, tool_choice, parallel_tool_calls)
    check_tools(list(plan.tools))
    others = [k for k in ("grammar", "json_schema", "regex") if sampling.get(k) is not None]
    if others and plan.mode != "none":
        raise ToolError(f"tools and {others[0]} together are not supported: give the answer's shape as "
                        "response_format")
    fmt = sampling.pop("response_format", None)
    ids = llm.tokenizer.encode(render_prompt(llm.template, messages, plan, tool_format), allowed_special="all")
    if plan.mode == "none":
        return assistant_message(llm.complete(ids, response_format=fmt, **sampling).text, [])
    if tool_format == "hermes":
        return _hermes_turn(llm, ids, plan, fmt, sampling)
    done = llm.complete(ids, constraint=output_constraint(plan, response_schema_of(fmt)), **sampling)
    content, calls = parse_reply(done.text)
    return assistant_message(content, calls)


def _hermes_turn(llm, ids: list[int], plan: ToolPlan, fmt, sampling: dict) -> dict:
    """Free text until the model writes ``<tool_call>``; from there the call is constrained (as llama.cpp's lazy
    grammars do), then ``</tool_call>`` is added and the text goes on. ``required`` opens with the tag."""
    from scratchlm.structured import json_schema_constraint

    call = json_schema_constraint(call_schema(plan))
    text, calls, budget = "", [], sampling.pop("max_new_tokens", 256)
    trigger = plan.mode == "required"
    while budget > 0 and len(calls) < (MAX_PARALLEL_CALLS if plan.parallel else 1):
        if not trigger:
            free = llm.complete(ids, stop=["<tool_call>"], max_new_tokens=budget, **sampling)
            text, ids, budget = text + free.text, ids + free.token_ids, budget - len(free.token_ids)
            trigger = "<tool_call>" in llm.tokenizer.decode(free.token_ids)
            if not trigger or budget <= 0:
                break
        opened = llm.tokenizer.encode("<tool_call>\n" if plan.mode == "required" and not calls else "\n")
        body = llm.complete(ids + opened, constraint=call, max_new_tokens=budget, **sampling)
        budget -= len(body.token_ids)
        if body.finish_reason == "length":
            break
        value = json.loads(body.text)
        calls.append(tool_call(value["name"], json.dumps(value["arguments"], ensure_ascii=False,
                                                         separators=(",", ":"))))
        closing = llm.tokenizer.encode("\n</tool_call>\n")
        ids = ids + opened + body.token_ids + closing
        trigger = False
    return assistant_message(text.strip() or None, calls)
