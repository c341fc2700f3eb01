"""One contract for prompts: a string (or a list of token ids, or for chat a list of message dicts) is ONE prompt
and gets one answer; a list of those is a batch and gets a list. Checked for complete, generate, chat, stream
and the server's /v1/completions, each against the same prompt run alone."""

from __future__ import annotations

import httpx
import pytest

from conftest import tiny_llm
from scratchlm.errors import ConfigError
from scratchlm.generate import Completion
from scratchlm.sampling import DEFAULT_SAMPLING, SamplingParams

GREEDY = dict(max_new_tokens=6, temperature=0, ignore_eos=True)
HI = [{"role": "user", "content": "hi"}]
BYE = [{"role": "user", "content": "bye now"}]


@pytest.fixture(scope="module")
def llm():
    return tiny_llm()


def test_complete_of_a_string_is_one_completion_not_one_per_character(llm):
    one = llm.complete("The sea is", **GREEDY)
    assert isinstance(one, Completion) and len(one.token_ids) == 6
    batch = llm.complete(["The sea is", "ab"], **GREEDY)
    assert isinstance(batch, list) and len(batch) == 2
    assert batch[0].token_ids == one.token_ids


def test_token_ids_are_one_prompt_and_a_list_of_them_a_batch(llm):
    ids = llm.tokenizer.encode("The sea is")
    assert llm.complete(ids, **GREEDY).token_ids == llm.complete("The sea is", **GREEDY).token_ids
    two = llm.complete([ids, ids[:3]], **GREEDY)
    assert len(two) == 2 and two[0].token_ids == llm.complete(ids, **GREEDY).token_ids


def test_generate_returns_a_string_for_a_string_and_a_list_for_a_list(llm):
    text = llm.generate("abc", **GREEDY)
    assert isinstance(text, str)
    texts = llm.generate(["abc", "a longer one"], **GREEDY)
    assert texts == [text, llm.generate("a longer one", **GREEDY)]
    assert llm.generate(["abc"], **GREEDY) == [text]


def test_chat_takes_one_conversation_or_a_list_of_them(llm):
    reply = llm.chat(HI, **GREEDY)
    assert isinstance(reply, str)
    assert llm.chat("hi", **GREEDY) == reply  # a string is one user message
    replies = llm.chat([HI, BYE], **GREEDY)
    assert replies == [reply, llm.chat(BYE, **GREEDY)]
    assert llm.chat(["hi", "bye now"], **GREEDY) == replies


def test_stream_yields_text_for_one_prompt_and_indexed_chunks_for_a_batch(llm):
    chunks = list(llm.stream("abc", **GREEDY))
    assert all(isinstance(c, str) for c in chunks) and "".join(chunks) == llm.generate("abc", **GREEDY)
    assert "".join(llm.stream(HI, **GREEDY)) == llm.chat(HI, **GREEDY)
    pairs = list(llm.stream(["abc", "xy z"], **GREEDY))
    assert all(isinstance(p, tuple) and len(p) == 2 for p in pairs)
    joined = ["".join(t for i, t in pairs if i == row) for row in range(2)]
    assert joined == llm.generate(["abc", "xy z"], **GREEDY)


@pytest.mark.parametrize("bad", [[], (), 3, [{"role": "user", "content": "x"}, "y"]])
def test_an_empty_or_malformed_prompt_is_a_clear_error(llm, bad):
    with pytest.raises(ConfigError):
        llm.complete(bad, **GREEDY)


def test_chat_refuses_token_ids(llm):
    with pytest.raises(ConfigError, match="conversation"):
        llm.chat([[1, 2, 3]], **GREEDY)


def test_llm_defaults_are_the_small_model_defaults_and_explicit_values_win(llm):
    params = llm.sampling()
    for name, value in DEFAULT_SAMPLING.items():
        assert getattr(params, name) == value
    assert llm.sampling(temperature=0.2, min_p=None).temperature == 0.2
    assert llm.sampling(min_p=None).min_p is None


def test_the_server_keeps_openai_defaults():
    from scratchlm.serve.jobs import sampling_params
    from scratchlm.serve.schemas import CompletionRequest

    params = sampling_params(CompletionRequest(model="m", prompt="x"), 16, None)
    assert (params.temperature, params.top_k, params.top_p, params.min_p, params.repetition_penalty) == (
        1.0, None, None, None, 1.0)
    assert params == SamplingParams(max_new_tokens=16, temperature=1.0)


def test_server_prompt_follows_the_same_rule(llm):
    from scratchlm.serve.app import create_app
    from scratchlm.serve.background import BackgroundServer

    ids = llm.tokenizer.encode("The sea is")
    with BackgroundServer(create_app(llm)) as url:
        def texts(prompt):
            body = {"model": llm.name, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]

        assert texts("The sea is") == [llm.generate("The sea is", **GREEDY)]
        assert texts(ids) == [llm.generate(ids, **GREEDY)]
        assert texts(["The sea is", "ab"]) == llm.generate(["The sea is", "ab"], **GREEDY)
        assert texts([ids, ids[:3]]) == llm.generate([ids, ids[:3]], **GREEDY)
