"""The server with the real SmolLM2-135M-Instruct: the official openai client and LangChain get the answers
the library gives, 32 concurrent streams match their requests run alone, and the log-likelihoods that
lm-evaluation-harness reads equal a direct forward pass."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

from scratchlm.sampling import PLAIN_SAMPLING
from scratchlm.serve.app import create_app
from scratchlm.serve.background import BackgroundServer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2):
    with BackgroundServer(create_app(smollm2, max_batch=16, max_queue=64, model_name="smollm2")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_chat_answers_like_the_library(client, smollm2):
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=20, temperature=0)
    ref = smollm2.complete([QUESTION], max_new_tokens=20, temperature=0)[0]
    assert r.choices[0].message.content == ref.text
    assert "Paris" in ref.text
    assert r.usage.prompt_tokens == len(smollm2.encode_chat(QUESTION))
    assert r.usage.completion_tokens == len(ref.token_ids) + (ref.finish_reason == "stop")
    assert r.choices[0].finish_reason == ref.finish_reason


def test_async_streamed_completion_equals_the_whole_one(server, smollm2):
    async def go():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0) as c:
            kwargs = dict(model="smollm2", prompt="The sea is", max_tokens=12, temperature=0.7, seed=1)
            whole = await c.completions.create(**kwargs)
            stream = await c.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
            return whole, [chunk async for chunk in stream]

    whole, chunks = asyncio.run(go())
    ref = smollm2.complete(["The sea is"], max_new_tokens=12, temperature=0.7, seed=1, **PLAIN_SAMPLING)[0]
    assert whole.choices[0].text == ref.text
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage == whole.usage


def test_langchain_invoke_and_stream(server, smollm2):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=server + "/v1", api_key="unused", model="smollm2", temperature=0, max_tokens=20)
    ref = smollm2.complete([QUESTION], max_new_tokens=20, temperature=0)[0].text
    assert chat.invoke(QUESTION[0]["content"]).content == ref
    assert "".join(chunk.content for chunk in chat.stream(QUESTION[0]["content"])) == ref


def test_32_concurrent_streams_match_each_request_alone(server, smollm2):
    # 8 different (prompt, seed) requests, each sent 4 times, all 32 at once.
    prompts = ["Once upon a time", "The best way to cook rice", "My favourite animal is", "In the year 2050",
               "Water boils at", "A good friend", "The mountain was", "Python is a"]
    requests = [(prompts[i % 8], 50 + i % 8) for i in range(32)]

    async def one(c, prompt, seed):
        stream = await c.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0.8,
                                            seed=seed, stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            text += "".join(choice.text for choice in chunk.choices)
            usage = chunk.usage or usage
        return text, usage

    async def go():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0) as c:
            return await asyncio.gather(*(one(c, p, s) for p, s in requests))

    results = asyncio.run(go())
    refs = {i: smollm2.complete([prompts[i]], max_new_tokens=8, temperature=0.8, seed=50 + i, **PLAIN_SAMPLING)[0]
            for i in range(8)}
    for i, (text, usage) in enumerate(results):
        ref = refs[i % 8]
        assert text == ref.text, (i, text, ref.text)
        assert usage.prompt_tokens == len(smollm2.tokenizer.encode(prompts[i % 8]))
        assert usage.completion_tokens == len(ref.token_ids) + (ref.finish_reason == "stop")


def test_loglikelihood_as_lm_eval_harness_reads_it(server, smollm2):
    context = smollm2.tokenizer.encode("Question: What is the capital of France?\nAnswer:")
    continuation = smollm2.tokenizer.encode(" Paris")
    ids = context + continuation
    body = {"model": "smollm2", "prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0,
            "seed": 1234}
    lp = httpx.post(server + "/v1/completions", json=body, timeout=120).json()["choices"][0]["logprobs"]
    with torch.no_grad():
        direct = smollm2.model(torch.tensor([ids]))[0].log_softmax(-1)
    expected = [float(direct[p, ids[p + 1]]) for p in range(len(context) - 1, len(ids) - 1)]
    got = lp["token_logprobs"][len(context):-1]
    assert got == pytest.approx(expected, abs=2e-3)
    is_greedy = all(t == max(top.values()) for t, top in zip(got, lp["top_logprobs"][len(context):-1]))
    assert is_greedy == all(int(direct[p].argmax()) == ids[p + 1] for p in range(len(context) - 1, len(ids) - 1))


def test_embeddings_put_related_sentences_closer(client):
    texts = ["The cat sat on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply today.",
             "Interest rates and inflation worry investors."]
    vectors = torch.tensor([d.embedding for d in client.embeddings.create(model="smollm2", input=texts).data])
    assert torch.allclose(vectors.norm(dim=1), torch.ones(4), atol=1e-5)
    sim = vectors @ vectors.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 3]
    assert sim[2, 3] > sim[1, 2] and sim[2, 3] > sim[1, 3]
