"""Sampling against HF transformers' logits processors; generation, stop strings, streaming, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_llm
from scratchlm.errors import ContextLengthError, SamplingError
from scratchlm.generate import _longest_stop_prefix_suffix
from scratchlm.sampling import SamplingParams, apply_penalties, filter_logits

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as lp  # noqa: E402


def finite_mask(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 5, None, None), (0.7, None, 0.9, None), (1.3, None, None, 0.1), (0.8, 40, 0.95, None), (1.0, None, 0.5, None),
])
def test_filters_keep_the_same_tokens_as_hf(temperature, top_k, top_p, min_p):
    torch.manual_seed(0)
    logits = torch.randn(1, 300) * 3
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ours = filter_logits(logits[0].clone(), params)
    ref = lp.TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = lp.TopKLogitsWarper(top_k)(None, ref)
    if top_p:
        ref = lp.TopPLogitsWarper(top_p)(None, ref)
    if min_p:
        ref = lp.MinPLogitsWarper(min_p)(None, ref)
    assert torch.equal(finite_mask(ours), finite_mask(ref[0]))
    kept = finite_mask(ours)
    assert torch.allclose(ours[kept], ref[0][kept])


def test_repetition_penalty_matches_hf():
    torch.manual_seed(0)
    logits = torch.randn(1, 100)
    seen = torch.tensor([3, 7, 7, 50])
    ours = apply_penalties(logits[0].clone(), SamplingParams(repetition_penalty=1.3), seen, None)
    ref = lp.RepetitionPenaltyLogitsProcessor(1.3)(seen[None], logits.clone())[0]
    assert torch.allclose(ours, ref)


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(10)
    counts = torch.tensor([0, 2, 1, 0, 0, 0, 0, 0, 0, 0])
    out = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), None, counts)
    assert out.tolist()[:3] == [0.0, -(0.5 + 2 * 0.25), -(0.5 + 0.25)]


@pytest.mark.parametrize("kwargs,allowed", [
    (dict(temperature=-1.0), "between 0 and 100"), (dict(top_p=0.0), r"in \(0, 1\]"), (dict(top_k=0), ">= 1"),
    (dict(min_p=2.0), r"in \[0, 1\]"), (dict(max_new_tokens=0), ">= 1"), (dict(repetition_penalty=0), r"\(0, 10\]"),
    (dict(presence_penalty=3.0), "between -2 and 2"),
])
def test_invalid_sampling_values_name_the_allowed_range(kwargs, allowed):
    with pytest.raises(SamplingError, match=allowed):
        SamplingParams(**kwargs)


def test_greedy_generation_is_deterministic_and_counts_tokens():
    llm = tiny_llm()
    a = llm.complete(["hello"], max_new_tokens=12, temperature=0, ignore_eos=True)[0]
    b = llm.complete(["hello"], max_new_tokens=12, temperature=0, ignore_eos=True)[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12 and a.finish_reason == "length"
    # Greedy means argmax of the full forward at every step.
    ids = llm.tokenizer.encode("hello")
    for tok in a.token_ids:
        with torch.no_grad():
            assert llm.model(torch.tensor([ids]))[0, -1].argmax().item() == tok
        ids.append(tok)


def test_seed_makes_sampling_reproducible():
    llm = tiny_llm()
    run = [llm.complete(["abc"], max_new_tokens=20, temperature=1.0, seed=s, ignore_eos=True)[0].token_ids
           for s in (1, 1, 2)]
    assert run[0] == run[1]
    assert run[0] != run[2]


def test_batch_of_different_lengths_equals_each_prompt_alone():
    llm = tiny_llm("gpt2")
    prompts = ["a", "a much longer prompt than the first", "mid-size one"]
    kwargs = dict(max_new_tokens=10, temperature=0.9, seed=7, ignore_eos=True)
    batched = llm.complete(prompts, **kwargs)
    alone = [llm.complete([p], **kwargs)[0] for p in prompts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]


def test_stop_string_ends_generation_and_is_not_included():
    llm = tiny_llm()
    full = llm.complete(["xyz"], max_new_tokens=30, temperature=0, ignore_eos=True)[0]
    text = full.text
    stop = text[8:10]
    assert stop and text.find(stop) >= 0
    got = llm.complete(["xyz"], max_new_tokens=30, temperature=0, ignore_eos=True, stop=[stop, "never"])[0]
    assert got.text == text[: text.find(stop)]
    assert got.finish_reason == "stop"
    streamed = "".join(llm.stream("xyz", max_new_tokens=30, temperature=0, ignore_eos=True, stop=stop))
    assert streamed == got.text


def test_eos_token_stops_with_reason_stop():
    llm = tiny_llm()
    first = llm.complete(["q"], max_new_tokens=1, temperature=0)[0].token_ids[0]
    llm.eos_ids = {first}
    done = llm.complete(["q"], max_new_tokens=10, temperature=0)[0]
    assert done.token_ids == [] and done.text == "" and done.finish_reason == "stop"


def test_stream_chunks_join_to_the_generated_text():
    llm = tiny_llm()
    chunks = list(llm.stream("stream me", max_new_tokens=25, temperature=0, ignore_eos=True))
    assert "".join(chunks) == llm.generate("stream me", max_new_tokens=25, temperature=0, ignore_eos=True)
    assert all(chunks)


def test_prompt_longer_than_context_names_both_lengths():
    llm = tiny_llm()
    with pytest.raises(ContextLengthError, match="200 tokens.*128 tokens"):
        llm.generate("x" * 200, max_new_tokens=5)


def test_generation_stops_at_the_context_window():
    llm = tiny_llm()
    done = llm.complete(["y" * 120], max_new_tokens=50, temperature=0, ignore_eos=True)[0]
    assert len(done.token_ids) == 8 and done.finish_reason == "length"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abc", max_size=12), st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3))
def test_longest_stop_prefix_suffix_matches_brute_force(text, stops):
    expected = max([n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])] or [0])
    assert _longest_stop_prefix_suffix(text, tuple(stops)) == expected


def test_top_p_one_and_no_filters_keep_everything():
    logits = torch.randn(50)
    out = filter_logits(logits, SamplingParams(temperature=1.0, top_p=1.0))
    assert all(math.isfinite(v) for v in out.tolist())


def test_tiny_temperatures_decode_greedily_instead_of_overflowing():
    llm = tiny_llm()
    greedy = llm.complete(["abc"], max_new_tokens=8, temperature=0, ignore_eos=True)[0].token_ids
    assert llm.complete(["abc"], max_new_tokens=8, temperature=1e-300, ignore_eos=True)[0].token_ids == greedy
