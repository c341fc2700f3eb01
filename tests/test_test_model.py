"""``scratchlm serve test-model``: the built-in stand-in for client developers answers every route, always with the
same reply, greedy or sampled (tool calls too: REPLY in every string argument), and LangChain works against it
unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import openai
import pytest

from scratchlm.serve.background import free_port
from scratchlm.serve.test_model import REPLY, TEST_MODEL, build_test_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_request_gets_the_same_reply():
    llm = build_test_model()
    for messages, settings in [([{"role": "user", "content": "Hi"}], dict(temperature=0)),
                               ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Why?"}],
                                dict(temperature=1.5, seed=7, top_p=1.0)),
                               ([{"role": "user", "content": "x" * 300}], dict(temperature=1.0))]:
        assert llm.chat(messages, **settings) == REPLY
    assert llm.generate("Hello! This is", temperature=0, max_new_tokens=40) == REPLY[len("Hello! This is"):]
    assert llm.generate("anything", temperature=0, max_new_tokens=3) == "Hello! This"


@pytest.fixture(scope="module")
def server():
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "scratchlm.cli", "serve", TEST_MODEL, "--port", str(port)],
                            stderr=subprocess.PIPE, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                client.models.list()
                break
            except (openai.APIConnectionError, openai.InternalServerError):  # not listening, or still loading
                assert time.monotonic() < deadline
                time.sleep(0.05)
        print(f"test-model answered {time.perf_counter() - started:.2f} s after the process started")
        yield client
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_test_model_answers_every_route(server):
    assert [m.id for m in server.models.list().data] == [TEST_MODEL]
    chat = server.chat.completions.create(model=TEST_MODEL, messages=[{"role": "user", "content": "Hi"}],
                                          logprobs=True, top_logprobs=2, n=2, temperature=1.0)
    assert [c.message.content for c in chat.choices] == [REPLY, REPLY]
    assert chat.choices[0].finish_reason == "stop" and chat.choices[0].logprobs.content[0].logprob > -1e-6
    stream = server.chat.completions.create(model=TEST_MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            stream=True, max_tokens=5)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == "Hello! This is the" and len([p for p in pieces if p]) > 1
    completion = server.completions.create(model=TEST_MODEL, prompt="Hello! This is", max_tokens=3, logprobs=1)
    assert completion.choices[0].text == " the scratchlm test" and completion.usage.completion_tokens == 3
    vectors = server.embeddings.create(model=TEST_MODEL, input=["a cat", "a cat", "the sea"]).data
    assert vectors[0].embedding == vectors[1].embedding != vectors[2].embedding
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                                "parameters": {"type": "object", "required": ["city"],
                                                               "properties": {"city": {"type": "string"}}}}}]
    call = server.chat.completions.create(model=TEST_MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                          tools=tools, tool_choice="required").choices[0]
    assert call.finish_reason == "tool_calls" and call.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(call.message.tool_calls[0].function.arguments) == {"city": REPLY}
    with pytest.raises(openai.NotFoundError, match="this server serves 'test-model'"):
        server.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])


def test_langchain_chat_model_against_the_test_model(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=TEST_MODEL, base_url=str(server.base_url), api_key="none", max_retries=0)
    assert llm.invoke("What can you do?").content == REPLY
    assert "".join(chunk.content for chunk in llm.stream("And now?")) == REPLY

