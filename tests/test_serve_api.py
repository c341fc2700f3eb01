"""The OpenAI API as real clients use it: the official ``openai`` client (sync and async, streaming and not)
and LangChain's ``ChatOpenAI``, against a real uvicorn server on 127.0.0.1 with a tiny random model.
Every answer is checked against the library run directly (``LLM.complete``) with the same settings."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch

from conftest import tiny_llm
from scratchlm.sampling import PLAIN_SAMPLING
from scratchlm.serve.app import create_app
from scratchlm.serve.background import BackgroundServer

KEY = "test-key-123"


@pytest.fixture(scope="module")
def llm():
    return tiny_llm("llama", seed=7)


@pytest.fixture(scope="module")
def server(llm):
    app = create_app(llm, api_key=KEY, max_batch=8, max_queue=64, prefill_chunk=32)
    with BackgroundServer(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def aclient(server):
    """Makes an async client; each asyncio.run needs its own (its connections belong to one event loop)."""
    return lambda: openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def alone(llm, prompt, **settings):
    """What the library gives for one prompt (text, messages or ids) run by itself, with the server's (OpenAI's)
    defaults where the library's differ."""
    return llm.complete([prompt], **{**PLAIN_SAMPLING, **settings})[0]


def completion_tokens(ref) -> int:
    return len(ref.token_ids) + (ref.finish_reason == "stop")  # an end-of-sequence token counts too


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_completion_matches_the_library(client, llm):
    r = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=12, temperature=0.8,
                                       seed=42)
    ref = alone(llm, MESSAGES, max_new_tokens=12, temperature=0.8, seed=42)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(llm.encode_chat(MESSAGES))
    assert r.usage.completion_tokens == completion_tokens(ref)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_usage_matches_non_streamed(client):
    kwargs = dict(model="tiny-llama", messages=MESSAGES, max_tokens=15, temperature=1.0, seed=3)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_with_prompt_list_n_and_stop(client, llm):
    prompts = ["Once upon", "The sea"]
    r = client.completions.create(model="tiny-llama", prompt=prompts, n=2, max_tokens=10, temperature=1.0,
                                  seed=11, stop=["x", "q"])
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    total = 0
    for c in r.choices:
        prompt, j = prompts[c.index // 2], c.index % 2
        ref = alone(llm, prompt, max_new_tokens=10, temperature=1.0, seed=11 + j, stop=("x", "q"))
        assert c.text == ref.text and c.finish_reason == ref.finish_reason
        assert "x" not in c.text and "q" not in c.text
        # Ended on the end-of-sequence token (counted) rather than on a stop string (text cut short)?
        eos = ref.finish_reason == "stop" and llm.tokenizer.decode(ref.token_ids, skip_special=True) == ref.text
        total += len(ref.token_ids) + eos
    assert r.usage.prompt_tokens == sum(len(llm.tokenizer.encode(p)) for p in prompts)  # once per prompt
    assert r.usage.completion_tokens == total


def test_penalties_top_k_top_p_and_min_p_are_honoured(client, llm):
    for settings in (dict(temperature=0.0, presence_penalty=1.0, frequency_penalty=0.5),
                     dict(temperature=0.0, repetition_penalty=1.5), dict(top_k=5, temperature=1.0, seed=1),
                     dict(min_p=0.1, temperature=1.0, seed=2), dict(top_p=0.5, temperature=1.0, seed=3)):
        r = client.completions.create(model="tiny-llama", prompt="abc", max_tokens=8, extra_body=settings)
        assert r.choices[0].text == alone(llm, "abc", max_new_tokens=8, **settings).text, settings


def test_async_client_streams_and_completes(aclient, llm):
    async def go():
        client = aclient()
        whole = await client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=12,
                                                 temperature=0.7, seed=5)
        stream = await client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=12,
                                                  temperature=0.7, seed=5, stream=True,
                                                  stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        chat = await client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=4)
        await client.close()
        return whole, chunks, chat

    whole, chunks, chat = asyncio.run(go())
    ref = alone(llm, "Hello", max_new_tokens=12, temperature=0.7, seed=5)
    assert whole.choices[0].text == ref.text
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == completion_tokens(ref)
    assert chat.usage.completion_tokens <= 4


def test_echo_logprobs_are_the_models_log_likelihoods(client, llm):
    """What lm-evaluation-harness's local-completions sends for log-likelihood tasks: token ids, echo,
    max_tokens=1, logprobs=1, temperature 0; it sums token_logprobs[ctxlen:-1]."""
    context, continuation = [10, 20, 30, 40, 50], [60, 70, 80]
    ids = context + continuation
    body = {"model": "tiny-llama", "prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True,
            "temperature": 0, "seed": 1234}
    r = httpx.post(client.base_url.__str__().rstrip("/") + "/completions", json=body,
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()
    choice = r["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    with torch.no_grad():
        direct = llm.model(torch.tensor([ids]))[0].log_softmax(-1)
    expected = [float(direct[p, ids[p + 1]]) for p in range(len(ids) - 1)]
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(expected, abs=1e-4)
    ctxlen = len(context)
    loglikelihood = sum(lp["token_logprobs"][ctxlen:-1])
    assert loglikelihood == pytest.approx(sum(expected[ctxlen - 1:]), abs=1e-4)
    is_greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                             lp["top_logprobs"][ctxlen:-1]))
    assert is_greedy == all(int(direct[p].argmax()) == ids[p + 1] for p in range(ctxlen - 1, len(ids) - 1))
    assert choice["text"].startswith(llm.tokenizer.decode(ids))
    assert len(lp["tokens"]) == len(lp["text_offset"]) == len(ids) + 1 and lp["text_offset"][0] == 0
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][-1] <= len(choice["text"])
    assert r["usage"]["prompt_tokens"] == len(ids) and r["usage"]["completion_tokens"] == 1


def test_chat_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 6
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy takes the best token
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob >= item.top_logprobs[2].logprob
    assert "".join(bytes(i.bytes).decode("utf-8", "replace") for i in content) == r.choices[0].message.content


def test_embeddings_float_and_base64_agree_with_direct_computation(client, llm):
    texts = ["hello world", "a much longer sentence about the sea and the sky"]
    floats = client.embeddings.create(model="tiny-llama", input=texts, encoding_format="float")
    default = client.embeddings.create(model="tiny-llama", input=texts)  # the client asks for base64
    assert floats.usage.prompt_tokens == sum(len(llm.tokenizer.encode(t)) for t in texts)
    for text, f, b in zip(texts, floats.data, default.data):
        with torch.no_grad():
            h = llm.model.hidden_states(torch.tensor([llm.tokenizer.encode(text)]))[0].mean(0)
        assert f.embedding == pytest.approx((h / h.norm()).tolist(), abs=1e-5)
        assert b.embedding == pytest.approx(f.embedding, abs=1e-7)
        assert len(f.embedding) == llm.model.config.d_model


def test_seed_makes_sampling_reproducible(client):
    kwargs = dict(model="tiny-llama", prompt="xyz", max_tokens=20, temperature=1.0)
    a = client.completions.create(**kwargs, seed=1).choices[0].text
    assert client.completions.create(**kwargs, seed=1).choices[0].text == a
    assert any(client.completions.create(**kwargs, seed=s).choices[0].text != a for s in (2, 3, 4))


def test_langchain_chat_openai_invoke_and_stream(server, llm):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=server + "/v1", api_key=KEY, model="tiny-llama", temperature=0.5, seed=9,
                      max_tokens=10, max_retries=0)
    ref = alone(llm, [{"role": "user", "content": "Hello there"}], max_new_tokens=10, temperature=0.5, seed=9)
    message = chat.invoke("Hello there")
    assert message.content == ref.text
    assert message.usage_metadata["output_tokens"] == completion_tokens(ref)
    streamed = "".join(chunk.content for chunk in chat.stream("Hello there"))
    assert streamed == ref.text


def _batch_histogram(aclient) -> tuple[int, int]:
    """(decode steps so far, steps with at most 4 requests) from /metrics."""
    base = str(aclient().base_url).rstrip("/").removesuffix("/v1")
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    value = {line.split()[0]: int(float(line.split()[1])) for line in text.splitlines()
             if line.startswith("scratchlm_decode_batch_size")}
    return value["scratchlm_decode_batch_size_count"], value['scratchlm_decode_batch_size_bucket{le="4"}']


def test_32_concurrent_streams_match_each_request_alone(aclient, llm):
    prompts = [f"request {i}: " + "ab" * (i % 9) for i in range(32)]

    async def one(client, i):
        stream = await client.completions.create(model="tiny-llama", prompt=prompts[i], max_tokens=10 + i % 7,
                                                  temperature=0.9, seed=100 + i, stream=True,
                                                  stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage or usage
        return text, usage

    async def all_of_them():
        async with aclient() as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    before = _batch_histogram(aclient)
    results = asyncio.run(all_of_them())
    after = _batch_histogram(aclient)
    steps, small = after[0] - before[0], after[1] - before[1]
    assert steps - small > 0  # some decode steps ran more than 4 of the requests together
    for i, (text, usage) in enumerate(results):
        ref = alone(llm, prompts[i], max_new_tokens=10 + i % 7, temperature=0.9, seed=100 + i)
        assert text == ref.text, i
        assert usage.prompt_tokens == len(llm.tokenizer.encode(prompts[i]))
        assert usage.completion_tokens == completion_tokens(ref)


def test_health_metrics_and_access_log(server, client, caplog):
    with caplog.at_level("INFO", logger="scratchlm.serve.access"):
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "secret words"}],
                                       max_tokens=3, stream=True).close()
        client.completions.create(model="tiny-llama", prompt="secret words", max_tokens=3)
        # The server logs a request once its response has been sent, so on a busy machine the line can land
        # just after the client has its answer: wait for it (bounded).
        deadline = time.monotonic() + 20
        while True:
            lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "scratchlm.serve.access"]
            if any(x["path"] == "/v1/completions" for x in lines) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    completion = [x for x in lines if x["path"] == "/v1/completions"][-1]
    assert completion["status"] == 200 and completion["prompt_tokens"] == 12
    assert completion["completion_tokens"] >= 1 and "duration_ms" in completion
    assert not any("secret" in json.dumps(x) for x in lines)  # no prompt text without --log-prompts
    health = httpx.get(server + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["max_batch"] == 8
    text = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("scratchlm_requests_total", "scratchlm_prompt_tokens_total", "scratchlm_completion_tokens_total",
                 "scratchlm_time_to_first_token_seconds_bucket", "scratchlm_inter_token_latency_seconds_count",
                 "scratchlm_queue_depth", "scratchlm_batch_size"):
        assert name in text
    assert 'scratchlm_requests_total{route="/v1/completions",status="200"}' in text
    count = next(line for line in text.splitlines() if line.startswith("scratchlm_time_to_first_token_seconds_count"))
    assert int(count.split()[1]) >= 2


def test_streamed_logprobs_equal_the_non_streamed_ones(client):
    kwargs = dict(model="tiny-llama", prompt="Logprobs", max_tokens=10, temperature=0.8, seed=21, logprobs=2)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    chunks = list(client.completions.create(**kwargs, stream=True))
    streamed = [lp for c in chunks for ch in c.choices if ch.logprobs for lp in ch.logprobs.token_logprobs]
    assert streamed == whole.token_logprobs and len(streamed) >= 1
    assert all(len(top) == 2 for top in whole.top_logprobs)
