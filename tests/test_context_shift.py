"""Context shift: generation goes on past the context window; after a shift each token is the one a fresh forward
pass over the shifted sequence chooses, and the rotated cache holds the keys such a pass computes."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llm
from scratchlm.errors import ConfigError
from scratchlm.generate import ContextShift, DecodeStats, prefill, shift_context
from scratchlm.model import KVCache

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "hello world, this is a test"


def replay(llm, prompt_ids: list[int], output: list[int], window: int, keep: int) -> list[torch.Tensor]:
    """For every output token, the logits of a fresh forward pass (no cache) over the sequence it was chosen from:
    the cached window, shifted by the rule whenever it is full, plus the newest token."""
    cached, logits = list(prompt_ids), []
    with torch.no_grad():
        logits.append(llm.model(torch.tensor([cached]))[0, -1])
        for token in output[:-1]:
            if len(cached) + 1 > window:
                drop = (len(cached) - keep) // 2
                cached = cached[:keep] + cached[keep + drop:]
            cached.append(token)
            logits.append(llm.model(torch.tensor([cached]))[0, -1])
    return logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tokens_after_a_shift_equal_a_fresh_forward_over_the_shifted_sequence(kind):
    llm = tiny_llm(kind)  # context window of 128 tokens; gpt2 has learned positions
    stats = DecodeStats()
    done = llm.complete(PROMPT, temperature=0, max_new_tokens=300, ignore_eos=True, context_shift=True, keep=5,
                        stats=stats)
    assert len(done.token_ids) == 300 and done.finish_reason == "length" and stats.shifts >= 3
    prompt_ids = llm.tokenizer.encode(PROMPT)
    fresh = replay(llm, prompt_ids, done.token_ids, llm.config.context_length, keep=5)
    assert [int(x.argmax()) for x in fresh] == done.token_ids


def test_speculative_decoding_shifts_at_the_same_points_as_plain_decoding():
    llm = tiny_llm()
    prompts = [PROMPT, "a much longer prompt than the first one, so that the rows fill their windows apart"]
    plain = llm.complete(prompts, temperature=0, max_new_tokens=260, ignore_eos=True, context_shift=True, keep=3)
    for draft in ("ngram", tiny_llm()):
        stats = DecodeStats()
        got = llm.complete(prompts, temperature=0, max_new_tokens=260, ignore_eos=True, context_shift=True, keep=3,
                           draft=draft, draft_tokens=4, stats=stats)
        assert [c.token_ids for c in got] == [c.token_ids for c in plain]
        assert stats.shifts >= 4 and stats.accepted > 0


def test_rotating_the_cache_gives_the_keys_a_fresh_pass_computes_in_the_first_layer():
    llm = tiny_llm()
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    cache = KVCache(llm.config, 1, 100)
    prefill(llm.model, [ids], cache)
    kept = shift_context(llm.model, cache, 0, ids, ContextShift(keep=4, mode="rotate"))
    assert kept == ids[:4] + ids[52:] and int(cache.lengths[0]) == 52
    fresh = KVCache(llm.config, 1, 100)
    prefill(llm.model, [kept], fresh)
    # Layer 0's keys and values depend only on each token and its position: re-rotation must reproduce them.
    torch.testing.assert_close(cache.k[0, 0, :, :52], fresh.k[0, 0, :, :52], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v[0, 0, :, :52], fresh.v[0, 0, :, :52])
    # Deeper layers saw the dropped tokens: that is the approximation rotate makes (recompute does not).
    assert not torch.allclose(cache.k[1, 0, :, 4:52], fresh.k[1, 0, :, 4:52], atol=1e-3)
    done = llm.complete(PROMPT, temperature=0, max_new_tokens=200, ignore_eos=True, context_shift="rotate")
    assert len(done.token_ids) == 200 and done.finish_reason == "length"


def test_without_a_shift_the_window_still_limits_the_output():
    llm = tiny_llm()
    done = llm.complete(PROMPT, temperature=0, max_new_tokens=300, ignore_eos=True)
    assert done.finish_reason == "length" and len(done.token_ids) == 128 - len(llm.tokenizer.encode(PROMPT))


def test_bad_shift_options_are_refused():
    llm = tiny_llm()
    with pytest.raises(ConfigError, match="more than half"):
        llm.generate(PROMPT, max_new_tokens=300, keep=100)
    with pytest.raises(ConfigError, match="keep=-2"):
        llm.generate(PROMPT, keep=-2)
    with pytest.raises(ConfigError, match="recompute or rotate"):
        llm.generate(PROMPT, context_shift="sideways")
