"""Tools in Python: specs from functions, tool_choice, the generic output format, its parsing and streaming."""

from __future__ import annotations

import enum
import json
from typing import Annotated, Literal

import jsonschema
import pytest
from pydantic import BaseModel

from conftest import tiny_llm
from scratchlm.chat import DEFAULT_TEMPLATE, ChatTemplate
from scratchlm.tool_stream import ToolStream, scan_generic
from scratchlm.tools import (
    Tool,
    ToolError,
    ToolPlan,
    history_as_text,
    output_schema,
    parse_hermes,
    parse_reply,
    plan_tools,
    run_tool_calls,
)

pytestmark = pytest.mark.usefixtures("one_thread")
VALIDATOR = jsonschema.Draft202012Validator


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Address(BaseModel):
    street: str
    number: int


class Order(BaseModel):
    item: str
    ship_to: Address


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
    """The current weather in a city.

    Args:
        city: the city's name,
            for example Paris
        unit: the temperature unit
    """
    return f"18 degrees {unit} in {city}"


def everything(name: str, count: int, ratio: float, flag: bool, tags: list[str], scores: dict[str, int],
               color: Color, pair: tuple[int, str], note: str | None = None,
               size: Annotated[int, "the size in cm"] = 3, order: Order | None = None) -> None:
    """Takes every kind of argument.

    :param name: who it is for
    :param count: how many
    """


# Small tools whose values stay short, so that a random model finishes its calls within the token budget.
def pick(color: Literal["red", "green", "blue"], n: Annotated[int, "a digit"]) -> str:
    """Pick a color."""
    return f"{n} {color}"


SHORT = [Tool.from_function(pick),
         Tool("lookup", "Look a word up.", {"type": "object", "properties": {
             "word": {"type": "string", "maxLength": 4}, "exact": {"type": "boolean"}}, "required": ["word"]}),
         Tool("now", "The time now.")]  # no parameters


def test_schema_from_function_reads_hints_defaults_and_docstring():
    tool = Tool.from_function(get_weather)
    assert tool.name == "get_weather" and tool.description == "The current weather in a city."
    schema = tool.parameters
    VALIDATOR.check_schema(schema)
    assert schema["required"] == ["city"]
    assert schema["properties"]["city"] == {"type": "string", "description": "the city's name, for example Paris"}
    assert schema["properties"]["unit"]["enum"] == ["celsius", "fahrenheit"]
    assert schema["properties"]["unit"]["default"] == "celsius"
    assert tool('{"city": "Oslo"}') == "18 degrees celsius in Oslo"


def test_schema_from_function_covers_every_kind_of_hint():
    schema = Tool.from_function(everything).parameters
    VALIDATOR.check_schema(schema)
    good = {"name": "a", "count": 1, "ratio": 0.5, "flag": True, "tags": ["x"], "scores": {"k": 2}, "color": "red",
            "pair": [1, "b"], "note": None, "size": 4, "order": {"item": "pen", "ship_to": {"street": "Main",
                                                                                               "number": 5}}}
    VALIDATOR(schema).validate(good)
    for bad in ({**good, "count": 1.5}, {**good, "color": "green"}, {**good, "pair": [1, 2]},
                {**good, "order": {"item": "pen", "ship_to": {"street": "Main"}}}, {**good, "extra": 1},
                {k: v for k, v in good.items() if k != "tags"}):
        assert not VALIDATOR(schema).is_valid(bad), bad
    assert schema["properties"]["name"]["description"] == "who it is for"
    assert schema["properties"]["size"]["description"] == "the size in cm"
    assert set(schema["required"]) == {"name", "count", "ratio", "flag", "tags", "scores", "color", "pair"}


def test_functions_that_cannot_be_tools_are_refused():
    def star(*args: int): ...
    def odd(x: set[complex]): ...
    with pytest.raises(ToolError, match="name each argument"):
        Tool.from_function(star)
    with pytest.raises(ToolError, match="no JSON schema"):
        Tool.from_function(odd)
    with pytest.raises(ToolError, match="not valid"):
        Tool("has space")


def test_tool_choice_forms():
    tools = [get_weather, pick]
    assert plan_tools(tools).mode == "auto" and len(plan_tools(tools).tools) == 2
    assert plan_tools([]).mode == "none"
    assert plan_tools(tools, "none").tools == ()
    named = plan_tools(tools, {"type": "function", "function": {"name": "pick"}}, parallel_tool_calls=False)
    assert (named.mode, [t.name for t in named.tools], named.parallel) == ("required", ["pick"], False)
    assert [t.name for t in plan_tools(tools, "pick").tools] == ["pick"]
    allowed = plan_tools(tools, {"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": "get_weather"}}]}})
    assert (allowed.mode, [t.name for t in allowed.tools]) == ("required", ["get_weather"])
    with pytest.raises(ToolError, match="not among the tools offered"):
        plan_tools(tools, {"type": "function", "function": {"name": "fly"}})
    with pytest.raises(ToolError, match="needs tools"):
        plan_tools([], "required")
    with pytest.raises(ToolError, match="no function name"):
        plan_tools([{"type": "function", "function": {"description": "x"}}])
    with pytest.raises(ToolError, match="unique"):
        plan_tools([get_weather, get_weather])


def test_output_schema_keeps_each_tools_refs():
    order = Tool.from_function(lambda order: None, name="place")  # no hint: any value
    nested = Tool("ship", "", Order.model_json_schema())
    plan = ToolPlan((order, nested), "auto", False)
    schema = output_schema(plan)
    VALIDATOR.check_schema(schema)
    call = {"tool_call": {"name": "ship", "arguments": {"item": "pen", "ship_to": {"street": "a", "number": 1}}}}
    VALIDATOR(schema).validate(call)
    VALIDATOR(schema).validate({"response": "hello"})
    assert not VALIDATOR(schema).is_valid({"tool_call": {"name": "ship", "arguments": {"item": "pen",
                                                                                        "ship_to": {"street": "a"}}}})


@pytest.mark.parametrize("choice,parallel", [("auto", True), ("required", False), ("lookup", True)])
def test_constrained_replies_are_valid_calls(choice, parallel):
    llm = tiny_llm(context_length=2048)
    schemas = {t.name: t.schema for t in SHORT}
    complete = 0
    for seed in range(2):
        message = llm.chat("Which color?", tools=SHORT, tool_choice=choice, parallel_tool_calls=parallel,
                           max_new_tokens=400, temperature=1.0, seed=seed)
        calls = message.get("tool_calls", [])
        if choice != "auto" and not calls:
            continue  # cut by the token budget: returned as text
        complete += 1
        if not parallel:
            assert len(calls) <= 1
        for call in calls:
            assert call["type"] == "function" and call["id"].startswith("call_")
            name = call["function"]["name"]
            assert name in schemas and (choice in ("auto", "required") or name == choice)
            VALIDATOR(schemas[name]).validate(json.loads(call["function"]["arguments"]))
        if not calls:
            assert isinstance(message["content"], str)
    assert complete >= 1


def test_stream_deltas_join_to_the_final_calls():
    llm = tiny_llm(context_length=2048)
    message = llm.chat("Pick", tools=SHORT, tool_choice="required", max_new_tokens=150, temperature=1.0, seed=1)
    assert message.get("tool_calls"), message
    text = json.dumps({"tool_calls": [{"name": c["function"]["name"], "arguments": json.loads(
        c["function"]["arguments"])} for c in message["tool_calls"]]}, ensure_ascii=False, separators=(",", ":"))
    stream, deltas = ToolStream(), []
    for i in range(0, len(text), 3):
        deltas += stream.feed(text[i:i + 3])
    joined: dict[int, dict] = {}
    for d in deltas:
        (item,) = d["tool_calls"]
        if "id" in item:  # the first delta of a call: id, type, name, empty arguments
            assert item["index"] == len(joined) and item["type"] == "function" and item["function"]["arguments"] == ""
            joined[item["index"]] = {"name": item["function"]["name"], "arguments": ""}
        else:
            assert set(item) == {"index", "function"} and set(item["function"]) == {"arguments"}
            joined[item["index"]]["arguments"] += item["function"]["arguments"]
    assert [(c["name"], json.loads(c["arguments"])) for c in joined.values()] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]


def test_streamed_response_text_decodes_escapes_as_they_complete():
    text = json.dumps({"response": 'say "hi" \u00e9 😀\n'})
    stream, content = ToolStream(), ""
    for ch in text:
        for d in stream.feed(ch):
            content += d["content"]
    assert content == 'say "hi" \u00e9 😀\n'
    assert parse_reply(text) == ('say "hi" \u00e9 😀\n', [])


def test_a_cut_reply_is_text_without_calls():
    cut = '{"tool_call":{"name":"pick","arguments":{"color":"re'
    assert parse_reply(cut) == (cut, [])
    scan = scan_generic(cut)
    assert scan.kind == "tool_call" and scan.calls[0].arguments == '{"color":"re' and not scan.complete


def test_hermes_replies_parse():
    content, calls = parse_hermes('Sure.\n<tool_call>\n{"name": "pick", "arguments": {"n": 1}}\n</tool_call>')
    assert content == "Sure." and calls[0]["function"] == {"name": "pick", "arguments": '{"n":1}'}


def test_history_with_tool_calls_and_null_content_renders():
    history = [{"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}]
    text = ChatTemplate(DEFAULT_TEMPLATE).render(history)  # `+ message['content']` failed on None before
    assert '<|im_start|>assistant\nI called get_weather with {"city":"Oslo"}.<|im_end|>' in text
    assert "<|im_start|>user\nget_weather returned: 18 degrees<|im_end|>" in text
    hermes = history_as_text(history, "hermes")
    assert hermes[1]["content"] == '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>'
    assert hermes[2] == {"role": "tool", "content": "<tool_response>\n18 degrees\n</tool_response>"}


def test_run_tool_calls_answers_with_tool_messages():
    message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"town":"Rome"}'}}]}
    ok, failed = run_tool_calls(message, [get_weather])
    assert ok == {"role": "tool", "tool_call_id": "call_a", "name": "get_weather",
                  "content": "18 degrees celsius in Rome"}
    assert failed["tool_call_id"] == "call_b" and failed["content"].startswith("error: TypeError")
