"""Errors in OpenAI's JSON shape with the right status, authentication on every route but /health, the 503
while loading, 429 when full, disconnects that free their slot, and a server that survives an engine fault."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time

import httpx
import openai
import pytest

from conftest import tiny_llm
from scratchlm.serve.app import create_app
from scratchlm.serve.background import BackgroundServer

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def llm():
    return tiny_llm("gpt2", seed=1)


@pytest.fixture(scope="module")
def server(llm):
    app = create_app(llm, api_key=KEY, max_batch=2, max_queue=2)
    with BackgroundServer(app) as url:
        yield url, app


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    for word in words:
        assert word in error["message"], error["message"]
    return error


def post(url: str, path: str, body, headers=AUTH, **kw) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=data, headers={"Content-Type": "application/json", **headers},
                      timeout=60, **kw)


def test_every_route_but_health_needs_the_key(server):
    url, app = server
    routes = [(m, r.path) for r in app.routes for m in getattr(r, "methods", ()) if m in ("GET", "POST")]
    paths = {p for _, p in routes}
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/metrics", "/",
            "/openapi.json", "/health"} <= paths
    routes += [("GET", "/static/chat.js"), ("GET", "/no/such/route"), ("POST", "/v1/models/x")]
    for method, path in routes:
        path = path.replace("{model}", "tiny-gpt2")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"},
                        {"Authorization": KEY}):
            r = httpx.request(method, url + path, headers=headers, json={})
            if path == "/health":
                assert r.status_code == 200
            else:
                assert assert_error(r, 401, "API key")["code"] == "invalid_api_key"
    # The right key opens them; so does HTTP Basic with the key as password (the browser's login prompt).
    assert httpx.get(url + "/v1/models", headers=AUTH).status_code == 200
    basic = base64.b64encode(f"anyone:{KEY}".encode()).decode()
    assert httpx.get(url + "/", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    assert httpx.get(url + "/").headers["www-authenticate"].startswith("Basic")


def test_invalid_values_are_400_with_the_parameter_named(server):
    url, _ = server
    chat = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        ({**chat, "temperature": 5}, "temperature"), ({**chat, "top_p": 0}, "top_p"), ({**chat, "n": 1000}, "n"),
        ({**chat, "presence_penalty": 9}, "presence_penalty"), ({**chat, "max_tokens": -1}, "max_tokens"),
        ({**chat, "messages": []}, "messages"), ({**chat, "messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({**chat, "stop": ["a"] * 40}, "stop"), ({**chat, "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({**chat, "response_format": {"type": "xml"}}, "response_format"),
        ({**chat, "logit_bias": {"1": 5}}, "logit_bias"), ({**chat, "seed": 2**70}, "seed"),
        ({k: v for k, v in chat.items() if k != "model"}, "model"),
        ({**chat, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "text"),
    ]
    for body, word in cases:
        assert_error(post(url, "/v1/chat/completions", body), 400, word)
    completion = {"model": "tiny-gpt2", "prompt": "hi"}
    for body, word in [({**completion, "prompt": [99999]}, "vocabulary"), ({**completion, "prompt": ""}, "empty"),
                       ({**completion, "prompt": []}, "empty"), ({**completion, "max_tokens": 0}, "max_tokens"),
                       ({**completion, "suffix": "x"}, "suffix"), ({**completion, "best_of": 3}, "best_of"),
                       ({**completion, "logprobs": 21}, "logprobs"), ({**completion, "prompt": {"a": 1}}, "prompt")]:
        assert_error(post(url, "/v1/completions", body), 400, word)
    assert_error(post(url, "/v1/embeddings", {"model": "tiny-gpt2", "input": "x", "dimensions": 3}), 400, "dimension")


def test_context_overflow_says_both_lengths(server):
    url, _ = server
    r = post(url, "/v1/completions", {"model": "tiny-gpt2", "prompt": "x" * 100, "max_tokens": 50})
    error = assert_error(r, 400, "128", "150", "100")
    assert error["code"] == "context_length_exceeded"
    assert_error(post(url, "/v1/embeddings", {"model": "tiny-gpt2", "input": "y" * 200}), 400, "128", "200")


def test_malformed_bodies_unknown_models_and_routes(server):
    url, _ = server
    assert_error(post(url, "/v1/chat/completions", b"{not json"), 400, "JSON")
    assert_error(post(url, "/v1/chat/completions", b"[1, 2]"), 400)
    assert_error(post(url, "/v1/chat/completions", b"\xff\xfe"), 400)
    r = httpx.post(url + "/v1/completions", content=b'{"model": "tiny-gpt2", "prompt": "x"}',
                   headers={**AUTH, "Content-Type": "text/plain"})
    assert_error(r, 400, "application/json")
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    assert assert_error(post(url, "/v1/chat/completions", body), 404, "gpt-4o")["code"] == "model_not_found"
    assert_error(httpx.get(url + "/v1/nothing", headers=AUTH), 404)
    assert_error(httpx.get(url + "/v1/completions", headers=AUTH), 405)
    r = post(url, "/v1/completions", b"x" * (9 * 2**20))
    assert_error(r, 413)


def test_openai_client_raises_its_typed_errors(server):
    url, _ = server
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny-gpt2", prompt="z" * 200, max_tokens=5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_full_queue_answers_429_and_a_disconnect_frees_the_slot(server):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    # Two slots and two queue places: four long streams fill the server, the fifth request is refused.
    streams = [client.completions.create(model="tiny-gpt2", prompt="a", max_tokens=120, stream=True,
                                         extra_body={"ignore_eos": True}, temperature=0) for _ in range(4)]
    for s in streams[:2]:
        next(iter(s))  # both slots are decoding
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model="tiny-gpt2", prompt="b", max_tokens=1)
    assert info.value.body["code"] == "rate_limit_exceeded"
    for s in streams:
        s.close()  # the clients hang up mid-stream
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = httpx.get(url + "/health").json()
        if health["active"] == 0 and health["waiting"] == 0:
            break
        time.sleep(0.02)
    assert (health["active"], health["waiting"]) == (0, 0)
    assert client.completions.create(model="tiny-gpt2", prompt="b", max_tokens=1).usage.completion_tokens == 1


def test_non_streamed_request_of_a_client_that_hangs_up_is_cancelled(server):
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "tiny-gpt2", "prompt": "a", "max_tokens": 120, "temperature": 0}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").json()["active"] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
    deadline = time.monotonic() + 30
    while httpx.get(url + "/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert httpx.get(url + "/health").json()["active"] == 0


def test_503_while_the_model_loads():
    release = threading.Event()

    def slow_load():
        release.wait(60)
        return tiny_llm()

    app = create_app(slow_load, api_key=KEY)
    with BackgroundServer(app, wait_ready=False) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        assert assert_error(post(url, "/v1/chat/completions", body), 503, "loading")["code"] == "model_loading"
        assert_error(httpx.get(url + "/v1/models", headers=AUTH), 503)
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert post(url, "/v1/chat/completions", body).status_code == 200


def test_an_engine_fault_fails_the_request_not_the_server(server, llm):
    url, _ = server
    original = llm.model.logits
    calls = {"n": 0}

    def flaky(hidden):
        calls["n"] += 1
        if calls["n"] in (2, 4):  # the first request's first decode step, then the second's
            raise RuntimeError("simulated fault")
        return original(hidden)

    llm.model.logits = flaky
    try:
        body = {"model": "tiny-gpt2", "prompt": "q", "max_tokens": 5, "temperature": 0, "extra": 1}
        assert assert_error(post(url, "/v1/completions", body), 500, "simulated fault")["type"] == "server_error"
        stream = post(url, "/v1/completions", {**body, "stream": True})
        assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
        assert "simulated fault" in stream.text
    finally:
        del llm.model.logits
    assert post(url, "/v1/completions", body).status_code == 200


def test_extreme_sampling_values_are_answered(server):
    """Values the fuzzer found that overflow float32 inside the sampler: they mean "only the best token"."""
    url, _ = server
    base = {"model": "tiny-gpt2", "prompt": "abc", "max_tokens": 4, "seed": 1}
    greedy = post(url, "/v1/completions", {**base, "temperature": 0}).json()["choices"][0]["text"]
    for extreme in ({"temperature": 1e-300}, {"temperature": 5e-324}, {"top_p": 5e-324, "temperature": 1.0},
                    {"top_p": 1e-300, "temperature": 2.0}):
        r = post(url, "/v1/completions", {**base, **extreme})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, extreme


def test_a_megabyte_prompt_is_refused_quickly(server):
    url, _ = server
    r = post(url, "/v1/completions", {"model": "tiny-gpt2", "prompt": "word " * 200_000, "max_tokens": 1})
    assert_error(r, 400, "1000000", "128")
