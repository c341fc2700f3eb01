"""Tools through the server, as the official ``openai`` client sends them: ``tools``, ``tool_choice``,
``parallel_tool_calls``, tool results in the conversation, streamed tool-call deltas in OpenAI's shape, tools with
``response_format``, and bad tool requests answered with OpenAI's error shape (a tiny random model: every call it
makes must still validate, since the grammar allows nothing else)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from conftest import tiny_llm
from scratchlm.serve.app import create_app
from scratchlm.serve.background import BackgroundServer
from scratchlm.tools import ToolPlan, as_tools, render_prompt
from structured_helpers import FIXED, random_schemas

pytestmark = pytest.mark.usefixtures("one_thread")
MESSAGES = [{"role": "user", "content": "Pick something."}]
PICK = {"type": "function", "function": {"name": "pick", "description": "Pick a color.", "parameters": {
    "type": "object", "properties": {"color": {"enum": ["red", "blue"]}, "n": {"type": "integer", "minimum": 0,
                                                                              "maximum": 9}},
    "required": ["color", "n"], "additionalProperties": False}}}
CODE = {"type": "function", "function": {"name": "code", "parameters": FIXED["code"], "strict": True}}
NOW = {"type": "function", "function": {"name": "now", "description": "The time."}}  # no parameters


def as_object(schema: dict) -> dict:
    """Tool parameters are objects: wrap a random schema that is not one."""
    if schema.get("type") == "object" and "$ref" not in schema:
        return schema
    defs = schema.pop("$defs", None)
    wrapped = {"type": "object", "properties": {"value": schema}, "required": ["value"]}
    return {**wrapped, "$defs": defs} if defs else wrapped


@pytest.fixture(scope="module")
def llm():
    return tiny_llm("llama", seed=5, context_length=4096)


@pytest.fixture(scope="module")
def server(llm):
    with BackgroundServer(create_app(llm, max_batch=8, max_queue=64, model_name="tiny")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def check_calls(choice, schemas: dict, parallel: bool = True) -> int:
    """Every call names an offered tool and its arguments validate (Draft 2020-12); the number of calls."""
    calls = choice.message.tool_calls or []
    if choice.finish_reason == "length":
        return 0
    assert (choice.finish_reason == "tool_calls") == bool(calls)
    assert parallel or len(calls) <= 1
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.Draft202012Validator(schemas[call.function.name]).validate(json.loads(call.function.arguments))
    return len(calls)


def test_generated_tool_schemas_give_valid_calls_greedy_and_sampled(client):
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": as_object(s)}}
             for i, s in enumerate(random_schemas(4, seed=3))]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    made = 0
    for parallel, kwargs in ((True, dict(temperature=0)), (False, dict(temperature=1.0, seed=1, n=4))):
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=tools, tool_choice="required",
                                           parallel_tool_calls=parallel, max_tokens=200, **kwargs)
        made += sum(check_calls(c, schemas, parallel) for c in r.choices)
    assert made >= 3


def test_streamed_tool_call_deltas_have_openais_shape(client):
    kwargs = dict(model="tiny", messages=MESSAGES, tools=[PICK, CODE, NOW], tool_choice="required", max_tokens=200,
                  temperature=1.0, seed=4)
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls"
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta
        finish = chunk.choices[0].finish_reason or finish
        for d in delta.tool_calls or []:
            if d.index not in calls:  # the first delta of a call: id, type and name, no arguments yet
                assert d.id.startswith("call_") and d.type == "function" and d.function.arguments == ""
                calls[d.index] = {"name": d.function.name, "arguments": ""}
            else:  # later deltas: only argument fragments
                assert d.id is None and d.type is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments
    assert finish == "tool_calls" and sorted(calls) == list(range(len(calls)))
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_tool_choice_forms_and_parallel_false(client):
    schemas = {"pick": PICK["function"]["parameters"], "code": FIXED["code"], "now": {"type": "object"}}
    for choice in ({"type": "function", "function": {"name": "code"}},
                   {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
                       {"type": "function", "function": {"name": "code"}}]}}):
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[PICK, CODE, NOW], n=2,
                                           tool_choice=choice, parallel_tool_calls=False, max_tokens=120,
                                           temperature=1.0, seed=6)
        for c in r.choices:
            if check_calls(c, schemas, parallel=False):
                assert c.message.tool_calls[0].function.name == "code"
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[PICK], tool_choice="none",
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and isinstance(r.choices[0].message.content, str)


def test_tools_with_response_format_shape_the_answer(client):
    answer = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": answer, "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[PICK], response_format=fmt, n=8,
                                       max_tokens=60, temperature=1.0, seed=3)
    kinds = set()
    for c in r.choices:
        if c.finish_reason == "length":
            continue
        if c.message.tool_calls:
            check_calls(c, {"pick": PICK["function"]["parameters"]})
            kinds.add("call")
        else:
            jsonschema.validate(json.loads(c.message.content), answer)
            kinds.add("answer")
    assert kinds  # at least one finished reply, and each finished one is a valid call or a valid answer


def test_tool_results_and_null_content_go_into_the_prompt(client, llm):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_7", "type": "function", "function": {"name": "pick", "arguments": '{"color":"red","n":2}'}}]},
        {"role": "tool", "tool_call_id": "call_7", "content": "picked 2 red"}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=[PICK], max_tokens=60, temperature=0)
    plan = ToolPlan(tuple(as_tools([PICK])), "auto", True)
    text = render_prompt(llm.template, history, plan)
    assert 'I called pick with {"color":"red","n":2}.' in text and "pick returned: picked 2 red" in text
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode(text, allowed_special="all"))


@pytest.mark.parametrize("body,status,param,needle", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, 400, "tools", "no function name"),
    ({"tools": [PICK], "tool_choice": {"type": "function", "function": {"name": "fly"}}}, 400, "tool_choice",
     "'fly', which is not among the tools offered (pick)"),
    ({"tools": [{"type": "function", "function": {"name": "bad", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "uniqueItems": True}}}}}]}, 400, "tools",
     "uniqueItems"),
    ({"tools": [{"type": "function", "function": {"name": "long", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "minLength": 200}}, "required": ["x"]}}}],
      "tool_choice": "required", "max_tokens": 20}, 400, "tools", "raise max_tokens"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "array", "items": {"type": "integer"}, "minItems": 400}}}, "max_tokens": 20}, 400,
     "response_format", "raise max_tokens"),
    ({"tool_choice": "required"}, 400, "tool_choice", "needs tools"),
    ({"tools": [PICK], "grammar": 'root ::= "x"'}, 400, "grammar", "response_format"),
    ({"tools": [{"type": "retrieval"}]}, 400, "tools", "only 'function' tools"),
])
def test_bad_tool_requests_get_openais_error_shape(server, body, status, param, needle):
    r = httpx.post(server + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, **body}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and needle in error["message"], error
