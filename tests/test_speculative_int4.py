"""Speculative decoding on the default engine (SmolLM2 from its GGUF: int4 and int8 kernels): greedy output identical,
token for token, to plain greedy decoding, on grounded and open-ended prompts, with prompt lookup and a draft model.

The int4 kernel rounds its inputs to bfloat16, so a last-bit difference in a verification pass's activations can
become a different token; verification therefore attends one query at a time (``stepwise_attention``), which the
test below checks end to end, and the pass is compared with the plain result of each prompt decoded alone."""

from __future__ import annotations

import re

import pytest
import torch

from scratchlm.generate import DecodeStats, stream_sequences
from scratchlm.llm import LLM

PASSAGE = ("The lighthouse on Gull Island was built in 1874 from granite quarried on the mainland. Its lamp burned "
           "whale oil until 1902, then kerosene, and since 1931 an electric bulb of 1,000 watts. The keeper, Ada "
           "Marsh, kept the log for forty-one years and recorded every ship that passed.")
GROUNDED = [
    f"{PASSAGE}\n\nQuestion: {q}" for q in (
        "In which year was the lighthouse built, and from what stone?",
        "Repeat the second sentence word for word.",
        "List every fuel the lamp used, in order.",
        "Who kept the log, and for how long?",
    )
] + [
    f"Rewrite this text in the past tense, keeping every other word:\n{t}" for t in (
        "The river runs past the old mill, and the miller sells flour to the bakers of the town every morning.",
        "Our team meets on Mondays, reviews the open tickets, and assigns each one to the engineer who knows it best.",
    )
] + [
    "Extract the names from this list, one per line: Alice Smith (engineer), Bob Jones (designer), Carol White "
    "(manager), Dan Brown (analyst).",
    "Copy the following code and add a docstring:\ndef area(width, height):\n    return width * height\n",
]
OPEN_ENDED = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Give three tips for learning a new language.",
    "Explain what a neural network is in two sentences.",
    "Tell me a story about a dragon who loves books.",
    "Why is the sky blue?",
    "What should I cook for dinner tonight?",
    "Describe your favourite season and why.",
]


@pytest.fixture(scope="module")
def smollm2_int4(smollm2_path):
    """SmolLM2 as ``LLM.load`` gives it by default: its Q4_1 layers as int4, the rest int8, eager decoding."""
    llm = LLM.load(smollm2_path)
    assert type(llm.model.blocks[0].attn.qkv_proj).__name__ == "Int4Linear"  # the engine the test is about
    assert getattr(llm.model, "decoder", None) is None
    return llm


def conversation(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_int4_greedy_output_is_identical_with_prompt_lookup_on_grounded_and_open_ended_prompts(smollm2_int4):
    llm, stats = smollm2_int4, DecodeStats()
    for text in GROUNDED + OPEN_ENDED:
        # Each prompt alone: a batch's plain steps attend with a mask over rows of other lengths, which rounds
        # differently from the one-row step that verification reproduces (docs/decoding.md).
        plain = llm.complete([conversation(text)], temperature=0, max_new_tokens=64, ignore_eos=True)[0]
        spec = llm.complete([conversation(text)], temperature=0, max_new_tokens=64, ignore_eos=True, draft="ngram",
                            stats=stats)[0]
        assert spec.token_ids == plain.token_ids, text
    # Drafts were checked, many of them accepted (the grounded prompts copy), and some rejected: rejections roll the
    # cache back, so the comparison covers that path too.
    assert stats.generated == 64 * 16 and stats.accepted > 100 and stats.accepted < stats.drafted


def test_int4_greedy_output_is_identical_with_a_draft_model(smollm2_int4):
    """The model drafting for itself (its own int4 weights, a fixed draft length: the adaptive one would not draft
    with a drafter as costly as the model): nearly every draft passes, so each pass checks several positions at
    once, and the text must still be plain greedy's. (The drafter's own multi-token passes round as batched passes
    do, so a rare draft can differ from the model's choice: rejected, as any wrong draft.)"""
    llm = smollm2_int4
    for text in (GROUNDED[1], OPEN_ENDED[3]):
        plain = llm.complete([conversation(text)], temperature=0, max_new_tokens=24, ignore_eos=True)[0]
        stats = DecodeStats()
        seqs = llm.sequences([conversation(text)], llm.sampling(temperature=0, max_new_tokens=24, ignore_eos=True))
        for _ in stream_sequences(llm.model, seqs, draft=llm.model, draft_tokens=4, adaptive=False, stats=stats):
            pass
        assert seqs[0].output_ids == plain.token_ids, text
        assert stats.accepted >= 0.9 * stats.drafted > 0 and stats.tokens_per_forward > 3


def test_stepwise_attention_equals_one_token_steps_bit_for_bit(smollm2_int4):
    """The mechanism: a verification pass over 6 positions, for two rows at different positions (one with padding),
    gives exactly the logits of one-token steps of each row alone, where the masked batched pass does not."""
    model, cfg = smollm2_int4.model, smollm2_int4.config
    ids = smollm2_int4.tokenizer.encode(PASSAGE)
    from scratchlm.model import KVCache

    with torch.inference_mode():
        steps = []
        for start, n in ((40, 6), (33, 4)):
            cache = KVCache(cfg, 1, 128)
            model.hidden_states(torch.tensor([ids[:start]]), cache)
            steps.append(torch.cat([model(torch.tensor([[t]]), cache)[0] for t in ids[start: start + n]]))
        batched = {}
        for stepwise in (False, True):
            cache = KVCache(cfg, 2, 128)  # each row's prefix prefilled alone, as the references' are
            model.hidden_states(torch.tensor([ids[:40]]), cache, rows=torch.tensor([0]))
            model.hidden_states(torch.tensor([ids[:33]]), cache, rows=torch.tensor([1]))
            fed = torch.tensor([ids[40:46], ids[33:37] + [0, 0]])
            batched[stepwise] = model(fed, cache, input_lengths=torch.tensor([6, 4])) if not stepwise else \
                model.logits(model.hidden_states(fed, cache, input_lengths=torch.tensor([6, 4]),
                                                 stepwise_attention=True))
            assert cache.lengths.tolist() == [46, 37]
    assert torch.equal(batched[True][0], steps[0]) and torch.equal(batched[True][1, :4], steps[1])
    assert not torch.equal(batched[False][0], steps[0])  # the masked pass rounds differently: the test has power


def test_int4_server_with_one_client_gives_plain_greedy_text_with_prompt_lookup(smollm2_int4):
    """The server's speculative step attends one position at a time when one row decodes alone, so a lone client's
    greedy reply equals the plain engine's (and ``llm.complete``'s) token for token on int4 too."""
    from scratchlm.serve.engine import Engine, GenerationJob
    from test_serve_support import run_jobs

    llm = smollm2_int4
    params = llm.sampling(temperature=0, max_new_tokens=32, ignore_eos=True)
    prompts = [seq.prompt_ids for seq in llm.sequences([conversation(GROUNDED[0])], params)]
    replies, accepted = {}, 0.0
    for draft in (None, "ngram"):
        engine = Engine(llm, max_batch=1, draft=draft, prefix_cache_mb=0).start()
        try:
            jobs = [GenerationJob(prompt, params, 32, index=i) for i, prompt in enumerate(prompts)]
            replies[draft] = {i: r["text"] for i, r in run_jobs(engine, jobs, timeout=600).items()}
            accepted = float(re.search(r"^scratchlm_draft_accepted_tokens_total (\S+)$", engine.metrics.render(),
                                       re.M).group(1))
        finally:
            engine.stop()
    assert replies["ngram"] == replies[None] and accepted > 0
    alone = llm.complete([conversation(GROUNDED[0])], temperature=0, max_new_tokens=32, ignore_eos=True)[0]
    assert replies[None][0] == alone.text
