"""The logprobs rule: every generated token is listed, an end-of-sequence token included.

With logprobs, ``tokens``, ``token_logprobs``, ``top_logprobs`` and ``text_offset`` (and chat's
``logprobs.content``) hold one entry per prompt token (with echo) plus one per completion token that
``usage.completion_tokens`` counts, streamed or not, as OpenAI and vLLM answer. lm-evaluation-harness's
``local-completions`` relies on it: it drops the last entry (the generated token) and sums the rest of the
continuation, so a missing end-of-text entry cost it the continuation's last token (issue 20).

The tiny model's head is skewed towards its end-of-sequence token so that many random requests end on it.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_llm
from scratchlm.serve.app import create_app
from scratchlm.serve.background import BackgroundServer

pytestmark = pytest.mark.usefixtures("one_thread")


def eos_prone_llm():
    """A tiny random model that ends about a third of its sampled steps with its end-of-sequence token."""
    llm = tiny_llm("llama", seed=11)
    (eos,) = llm.eos_ids
    with torch.no_grad():
        head = llm.model.lm_head.weight
        head.mul_(0.2)  # the other tokens: nearly uniform
        head[eos] = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(3)) * 0.75
    return llm


@pytest.fixture(scope="module")
def llm():
    return eos_prone_llm()


@pytest.fixture(scope="module")
def http(llm):
    app = create_app(llm, max_batch=4, max_queue=64, prefill_chunk=32)
    with BackgroundServer(app) as url, httpx.Client(base_url=url + "/v1", timeout=60) as client:
        yield client


def post(http, path: str, body: dict) -> dict:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def streamed(http, path: str, body: dict) -> list[dict]:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    chunks = []
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    return chunks


def test_an_end_of_text_token_generated_by_echo_scoring_is_listed(http, llm):
    """The request of issue 20: echo, logprobs=1, max_tokens=1, and the one generated token is the end."""
    (eos,) = llm.eos_ids
    for start in range(256):  # find a prompt after which greedy decoding ends at once
        ids = [start, 65, 66, 67]
        with torch.no_grad():
            if int(llm.model(torch.tensor([ids]))[0, -1].argmax()) == eos:
                break
    else:
        pytest.fail("no prompt makes the skewed model end at once")
    r = post(http, "/completions", {"model": "tiny-llama", "prompt": [ids], "max_tokens": 1, "logprobs": 1,
                                    "echo": True, "temperature": 0})
    choice, usage = r["choices"][0], r["usage"]
    assert choice["finish_reason"] == "stop" and usage["completion_tokens"] == 1
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
    assert lp["tokens"][-1] == llm.tokenizer.decode([eos]) and lp["token_logprobs"][-1] is not None
    assert lp["text_offset"][-1] == len(choice["text"])  # its text is empty: it starts where the text ends
    with torch.no_grad():
        direct = llm.model(torch.tensor([ids]))[0].log_softmax(-1)
    # What the harness computes: token_logprobs[ctxlen:-1] is the continuation's, here the last prompt token.
    assert lp["token_logprobs"][len(ids) - 1:-1] == pytest.approx([float(direct[-2, ids[-1]])], abs=1e-4)
    assert lp["token_logprobs"][-1] == pytest.approx(float(direct[-1, eos]), abs=1e-4)


requests = st.fixed_dictionaries({
    "prompt": st.lists(st.integers(0, 255), min_size=1, max_size=12),
    "max_tokens": st.integers(1, 6),
    "logprobs": st.integers(0, 3),
    "echo": st.booleans(),
    "temperature": st.sampled_from([0.0, 1.0]),
    "seed": st.integers(0, 2**16),
    "stop": st.sampled_from([None, ["a"], ["e", "t"], ["\n"]]),
    "n": st.integers(1, 2),
})


def prompt_entries(body: dict) -> int:
    return len(body["prompt"][0]) if body["echo"] else 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=requests)
def test_completion_logprob_arrays_have_prompt_plus_completion_tokens_entries(http, llm, body):
    body = {"model": "tiny-llama", **body, "prompt": [body["prompt"]]}
    r = post(http, "/completions", body)
    # Offsets count characters of prompt + completion; without echo the text holds the completion only.
    unseen = 0 if body["echo"] else len(llm.tokenizer.decode(body["prompt"][0]))
    total = 0
    for choice in r["choices"]:
        lp = choice["logprobs"]
        n = len(lp["tokens"])
        assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][-1] <= unseen + len(choice["text"])
        assert 1 <= n - prompt_entries(body) <= body["max_tokens"]
        total += n - prompt_entries(body)
    assert total == r["usage"]["completion_tokens"]

    chunks = streamed(http, "/completions", body)  # seeded: the same tokens as the whole answer
    usage = chunks[-1]["usage"]
    assert usage == r["usage"]
    listed = sum(len(ch["logprobs"]["token_logprobs"]) for c in chunks for ch in c["choices"] if ch["logprobs"])
    assert listed == len(r["choices"]) * prompt_entries(body) + usage["completion_tokens"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet="abcdet \n", min_size=1, max_size=10), max_tokens=st.integers(1, 6),
       temperature=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 2**16), top=st.integers(0, 3))
def test_chat_logprob_content_has_one_item_per_completion_token(http, text, max_tokens, temperature, seed, top):
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed, "logprobs": True, "top_logprobs": top}
    r = post(http, "/chat/completions", body)
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"]
    assert all(len(item["top_logprobs"]) == top for item in content)
    chunks = streamed(http, "/chat/completions", body)
    items = [item for c in chunks for ch in c["choices"] if ch.get("logprobs") for item in ch["logprobs"]["content"]]
    assert len(items) == chunks[-1]["usage"]["completion_tokens"]
    assert [i["logprob"] for i in items] == pytest.approx([i["logprob"] for i in content])


def test_offsets_count_the_text_as_the_reply_holds_it_special_tokens_and_split_characters_included(llm):
    # Found by the property test above: a sampled <|endoftext|> (not the end-of-sequence token here) is skipped
    # in the completion's text but was counted as 13 characters, so the next offset pointed past the text.
    from scratchlm.serve.events import TokenLogprob
    from scratchlm.serve.schemas import completion_logprobs

    tok = llm.tokenizer
    special = tok.special_tokens["<|endoftext|>"]
    euro = list("€".encode())  # three byte tokens: one character
    prompt = [ord("a"), special, euro[0]]  # echoed: "a<|endoftext|>" and U+FFFD for the cut character
    completion = [special, ord("L"), *euro, ord("x")]
    prompt_text, text = tok.decode(prompt), tok.decode(completion, skip_special=True)
    entries = [TokenLogprob(t, -1.0, []) for t in prompt + completion]
    offsets = completion_logprobs(entries, str, 0, tok, prompt_count=len(prompt))["text_offset"]
    assert prompt_text == "a<|endoftext|>\ufffd" and text == "L€x"
    start = len(prompt_text)
    assert offsets == [0, 1, 14, start, start, start + 1, start + 1, start + 1, start + 2]
    # without echo the offsets start after the prompt's text and count the completion alone
    alone = completion_logprobs(entries[len(prompt):], str, start, tok)["text_offset"]
    assert alone == offsets[len(prompt):] and alone[-1] < start + len(text)
