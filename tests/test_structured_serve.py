"""Structured output through the server, as the official ``openai`` client sends it: ``response_format``
(``json_object`` and ``json_schema``) on /v1/chat/completions, streamed and not, and the ``response_format`` /
``grammar`` extensions on /v1/completions; a schema the server cannot honour is a 400 that names the keyword."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from conftest import tiny_llm
from scratchlm.serve.app import create_app
from scratchlm.serve.background import BackgroundServer
from structured_helpers import FIXED

KEY = "structured-key"
MESSAGES = [{"role": "user", "content": "Give me a product as JSON."}]


@pytest.fixture(scope="module")
def client():
    app = create_app(tiny_llm("llama", seed=11), api_key=KEY, max_batch=8, max_queue=64, prefill_chunk=32)
    with BackgroundServer(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_chat_json_schema_validates_streamed_and_not(client):
    schema = FIXED["code"]
    r = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=80, temperature=1.0,
                                       seed=3, n=3, response_format=_schema_format(schema))
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)
    chunks = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=80, temperature=1.0,
                                            seed=3, response_format=_schema_format(schema), stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content  # same seed, same constrained draw, streamed


def test_chat_json_object(client):
    r = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=80, temperature=1.0,
                                       seed=1, n=4, response_format={"type": "json_object"})
    finished = [c for c in r.choices if c.finish_reason == "stop"]
    for choice in finished:
        assert isinstance(json.loads(choice.message.content), dict)
    for choice in r.choices:
        assert choice.message.content.startswith("{")


def test_completions_grammar_and_response_format_extensions(client):
    r = client.completions.create(model="tiny-llama", prompt="code:", max_tokens=20, temperature=1.0, seed=2,
                                  extra_body={"grammar": 'root ::= [A-Z]{3} "-" [0-9]{2}'})
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny-llama", prompt="{", max_tokens=80, temperature=1.0, seed=4,
                                  extra_body={"response_format": _schema_format(FIXED["list"])})
    jsonschema.validate(json.loads(r.choices[0].text), FIXED["list"])


def test_bad_constraints_are_400_naming_the_problem(client):
    cases = [
        (_schema_format({"type": "string", "uniqueItems": True}), "uniqueItems"),
        (_schema_format({"type": "array", "minItems": 2, "maxItems": 1}), "no value can match"),
        ({"type": "json_schema"}, "json_schema"),
        ({"type": "xml"}, "response_format"),
    ]
    for response_format, needle in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=5,
                                           response_format=response_format)
        assert needle in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=5,
                                  extra_body={"grammar": 'root ::= root "a" | "b"'})
    assert "left-recursive" in info.value.body["message"]
