"""Speculative decoding: greedy output identical to plain decoding, sampled output distributed as the model's
(chi-square against the exact distribution), penalties and stop strings unchanged, one-line errors."""

from __future__ import annotations

import pytest
import torch

from conftest import byte_tokenizer, tiny_llm
from scratchlm import cli_options, speculative
from scratchlm.errors import ConfigError
from scratchlm.generate import DecodeStats, Sequence, stream_sequences
from scratchlm.llm import LLM
from scratchlm.sampling import SamplingParams, apply_penalties, filter_logits, make_generator

scipy_stats = pytest.importorskip("scipy.stats")
pytestmark = pytest.mark.usefixtures("one_thread")

COPYING = "the cat sat on the mat. the cat sat on the mat. the cat sat on the mat. the cat"


def peaky(seed: int = 0, scale: float = 40.0, noise: float = 0.0) -> LLM:
    """A tiny random model whose next-token distributions are far from uniform (a scaled LM head); ``noise``
    perturbs that head, for a drafter that resembles the model without being it."""
    llm = tiny_llm(seed=seed)
    with torch.no_grad():
        head = llm.model.lm_head.weight
        head.mul_(scale).add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(7)) * noise)
    return llm


def test_greedy_is_identical_with_every_drafter_and_rejections_roll_the_cache_back():
    llm, stranger = tiny_llm(), tiny_llm(seed=1)  # the stranger's drafts are almost always rejected
    prompts = [COPYING, "abcabcabcabcabc", "hello there", "zz"]
    plain = llm.complete(prompts, temperature=0, max_new_tokens=40, ignore_eos=True)
    for draft in ("ngram", stranger, llm):
        stats = DecodeStats()
        got = llm.complete(prompts, temperature=0, max_new_tokens=40, ignore_eos=True, draft=draft, draft_tokens=4,
                           stats=stats)
        assert [c.token_ids for c in got] == [c.token_ids for c in plain], draft
        assert stats.generated == 160 and stats.drafted > 0
        if draft is stranger:  # rejected drafts were written to the cache and must have been cut away
            assert stats.accepted < stats.drafted


def test_greedy_with_a_fixed_draft_length_counts_forward_passes():
    llm = tiny_llm()
    seqs = llm.sequences([COPYING], llm.sampling(temperature=0, max_new_tokens=30, ignore_eos=True))
    stats = DecodeStats()
    text = "".join(t for _, t in stream_sequences(llm.model, seqs, draft=llm.model, draft_tokens=3, adaptive=False,
                                                   stats=stats))
    assert text == llm.generate(COPYING, temperature=0, max_new_tokens=30, ignore_eos=True)
    # The model drafting for itself is always right: every pass yields its 3 drafts and one more token.
    assert stats.accepted == stats.drafted and stats.tokens_per_forward > 3.0


def test_penalties_stop_strings_and_constraints_are_unchanged():
    llm = tiny_llm()
    for options in (dict(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3),
                    dict(stop=["at", "t o"]), dict(regex="(cat|mat|sat)( (cat|mat|sat)){0,12}")):
        plain = llm.complete(COPYING, temperature=0, max_new_tokens=40, **options)
        got = llm.complete(COPYING, temperature=0, max_new_tokens=40, draft=tiny_llm(), draft_tokens=4, **options)
        assert (got.text, got.token_ids, got.finish_reason) == (plain.text, plain.token_ids, plain.finish_reason)


def test_adaptive_draft_length_turns_drafting_off_when_drafts_fail_and_probes_again():
    policy = speculative.DraftLength(8)
    assert policy.choose(room=100) > 0  # optimistic at first
    for _ in range(10):
        policy.update(drafted=4, accepted=0)
    choices = [policy.choose(room=100) for _ in range(speculative.PROBE_EVERY)]
    assert choices[:-1] == [0] * (speculative.PROBE_EVERY - 1) and choices[-1] == 1
    for _ in range(10):
        policy.update(drafted=4, accepted=4)
    assert policy.choose(room=100) == 8 and policy.choose(room=3) == 3
    # A drafter that costs as much as the model never pays for itself.
    assert speculative.DraftLength(8, draft_cost=1.0, prior=0.99).choose(room=100) == 0


def test_ngram_drafter_copies_what_followed_the_latest_match():
    drafter = speculative.NgramDrafter(max_ngram=3, min_ngram=2)
    assert drafter.propose([1, 2, 3, 4, 9, 9, 1, 2, 3, 5, 6, 1, 2, 3], k=3) == [5, 6, 1]
    assert drafter.propose([1, 2, 7, 8, 4, 2], k=2) == []  # no earlier (4, 2) nor (x, 4, 2)
    assert drafter.propose([5, 1, 2, 7, 1, 2], k=5) == [7, 1, 2]


def test_ngram_index_grown_step_by_step_finds_what_a_scan_finds():
    def scan(history, k):  # the definition: the latest earlier occurrence of the last 3, else 2, tokens
        for n in (3, 2):
            for end in range(len(history) - 2, n - 2, -1):
                if len(history) > n and history[end - n + 1: end + 1] == history[-n:]:
                    return history[end + 1: end + 1 + k]
        return []

    drafter, rng = speculative.NgramDrafter(), torch.Generator().manual_seed(0)
    history = torch.randint(0, 6, (40,), generator=rng).tolist()
    for step in range(300):
        history.append(int(torch.randint(0, 6, (1,), generator=rng)))
        assert drafter.propose(history, 5, row=0) == scan(history, 5), step
    other = [9, 8, 7, 9, 8]  # a reused row (a new request in a server slot) starts a new index
    assert drafter.propose(other, 5, row=0) == [7, 9, 8]


# ---- sampling: the rejection rule keeps the model's distribution ------------------------------------------
class FixedDrafter:
    """Proposes the same tokens every time, for sure (q one-hot), as prompt lookup does."""

    draft_cost = 0.0

    def __init__(self, tokens: list[int]):
        self.tokens = tokens

    def draft(self, rows, histories, windows, ks, seqs):
        return [(self.tokens[:k], None) for k in ks]


def exact_joint(llm: LLM, prompt: list[int], params: SamplingParams, steps: int) -> dict[tuple[int, ...], float]:
    """P(t1..t_steps | prompt) under the model with the sampler's penalties and filters, by enumeration."""
    joint = {(): 1.0}
    torch.set_grad_enabled(False)
    for _ in range(steps):
        grown = {}
        for prefix, mass in joint.items():
            ids = prompt + list(prefix)
            logits = llm.model(torch.tensor([ids]))[0, -1].float()
            counts = torch.zeros(llm.config.vocab_size, dtype=torch.long)
            for t in prefix:
                counts[t] += 1
            logits = apply_penalties(logits, params, torch.tensor(ids), counts)
            probs = filter_logits(logits, params).softmax(-1)
            for token in torch.nonzero(probs).flatten().tolist():
                grown[prefix + (token,)] = mass * float(probs[token])
        joint = grown
    torch.set_grad_enabled(True)
    return joint


def chi_square_p(observed: dict, expected_probs: dict, n: int) -> float:
    """Goodness of fit of ``observed`` counts to ``expected_probs``; outcomes expected fewer than 5 times pooled."""
    big = [k for k, p in expected_probs.items() if p * n >= 5]
    obs = [observed.get(k, 0) for k in big]
    exp = [expected_probs[k] * n for k in big]
    obs.append(n - sum(obs))  # the pooled rest, outcomes impossible under ``expected_probs`` included
    exp.append(n - sum(exp))
    return float(scipy_stats.chisquare(obs, exp).pvalue)


def sample(llm: LLM, prompt: list[int], params: SamplingParams, n: int, **run) -> tuple[dict, DecodeStats]:
    """Counts of the outputs of ``n`` sequences, each with its own seeded generator (a fixed seed budget)."""
    seqs = []
    for i in range(n):
        seq = Sequence(prompt, params, llm.tokenizer, set(), llm.config.vocab_size, llm.config.context_length)
        seq.generator = make_generator(1000 + i)
        seqs.append(seq)
    stats = DecodeStats()
    for _ in stream_sequences(llm.model, seqs, stats=stats, **run):
        pass
    counts: dict[tuple[int, ...], int] = {}
    for seq in seqs:
        counts[tuple(seq.output_ids)] = counts.get(tuple(seq.output_ids), 0) + 1
    return counts, stats


@pytest.mark.parametrize("drafter", ["model", "fixed"])
def test_sampled_tokens_follow_the_models_distribution(drafter):
    target, other = peaky(), peaky(noise=0.3)
    prompt = [10, 20, 30, 40, 50]
    # The first token is sampled plainly; the next two are drafted together, then one more comes free.
    params = SamplingParams(max_new_tokens=4, temperature=1.0, top_k=3, repetition_penalty=1.3, ignore_eos=True)
    p = exact_joint(target, prompt, params, steps=4)
    n = 2000
    if drafter == "model":
        draft = other.model
    else:  # propose the most likely continuation of the most likely first token, for sure
        draft = FixedDrafter(list(max(p, key=p.get)[1:]))
    observed, stats = sample(target, prompt, params, n, draft=draft, draft_tokens=2, adaptive=False)
    assert stats.drafted >= 2 * n and 0 < stats.accepted < stats.drafted  # both branches of the rule ran
    assert set(observed) <= set(p)  # never an outcome the model's sampler could not give
    assert chi_square_p(observed, p, n) > 1e-3
    if drafter == "model":  # the test tells distributions apart: the drafter's own samples fail it
        own, _ = sample(other, prompt, params, n)
        assert chi_square_p(own, p, n) < 1e-6


# ---- errors --------------------------------------------------------------------------------------------
def test_a_draft_model_with_another_vocabulary_or_tokenizer_is_refused():
    llm = tiny_llm()
    with pytest.raises(ConfigError, match="vocabulary of 300 tokens.*same tokenizer"):
        llm.generate("hi", draft=tiny_llm(vocab_size=300))
    tok = byte_tokenizer()
    swapped = dict(tok.vocab)
    swapped["a"], swapped["b"] = tok.vocab["b"], tok.vocab["a"]
    other = LLM(tiny_llm().model, type(tok)(swapped, [], tok.special_tokens, pretokenizer="gpt2",
                                            eos_token="<|im_end|>"))
    with pytest.raises(ConfigError, match="another tokenizer"):
        llm.generate("hi", draft=other)


@pytest.mark.parametrize("k", [0, 33, -1, True, 2.5])
def test_draft_tokens_out_of_range_is_refused(k):
    with pytest.raises(ConfigError, match="from 1 to 32"):
        tiny_llm().generate("hi", draft="ngram", draft_tokens=k)


def test_draft_options_need_a_drafter_and_a_known_kind():
    llm = tiny_llm()
    with pytest.raises(ConfigError, match="needs a drafter"):
        llm.generate("hi", draft_tokens=3)
    with pytest.raises(ConfigError, match="draft must be"):
        llm.generate("hi", draft=3)
    assert cli_options.MAX_DRAFT_TOKENS == speculative.MAX_DRAFT_TOKENS


@pytest.fixture
def model_dirs(tmp_path):
    from scratchlm.formats.checkpoint import save_model_dir

    dirs = {}
    for name, llm in (("tiny", tiny_llm()), ("wide", tiny_llm(vocab_size=300))):
        dirs[name] = save_model_dir(tmp_path / name, llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    return dirs


def test_cli_drafts_reports_and_refuses_bad_options_in_one_line(capsys, model_dirs):
    from scratchlm import cli

    tiny = str(model_dirs["tiny"])
    args = ["generate", tiny, COPYING, "--temperature", "0", "--max-new-tokens", "20"]
    assert cli.main(args) == 0
    plain = capsys.readouterr().out
    assert cli.main([*args, "--draft", "ngram", "--draft-tokens", "4", "--verbose"]) == 0
    out, err = capsys.readouterr()
    assert out == plain and "forward passes" in err and "drafted" in err and "tokens/s" in err
    for extra, fragment in ((["--draft", "ngram", "--draft-tokens", "0"], "from 1 to 32"),
                            (["--draft-tokens", "3"], "needs a drafter"),
                            (["--draft", str(model_dirs["wide"])], "same tokenizer"),
                            (["--keep", "-1"], "--keep -1")):
        code = cli.main([*args, *extra])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


# ---- the real model --------------------------------------------------------------------------------------
GROUNDED = [
    "Rewrite this sentence in the past tense: The committee meets every Tuesday to review the budget and "
    "the committee approves the new spending plan.",
    "Extract the names from this text: Alice Johnson met Bob Smith and Carol White at the library on Monday.",
    "Summarise: The river rose three metres overnight after heavy rain, flooding the low streets of the old town "
    "and closing the bridge to traffic until the river falls.",
    "Repeat exactly: one two three four five six seven eight nine ten",
]
OPEN = ["What is the capital of France?", "Write a haiku about autumn.", "Name three colours.",
        "Why is the sky blue?"]


def test_smollm2_greedy_output_is_identical_with_prompt_lookup_and_a_draft_model(smollm2):
    prompts = [[{"role": "user", "content": text}] for text in GROUNDED + OPEN]
    plain = smollm2.complete(prompts, temperature=0, max_new_tokens=24)
    stats = DecodeStats()
    spec = smollm2.complete(prompts, temperature=0, max_new_tokens=24, draft="ngram", stats=stats)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    assert stats.accepted > 0 and stats.forwards < stats.generated
    # The model drafting for itself (fixed K): every path of the model drafter, on the real model.
    seqs = smollm2.sequences(prompts[:2], smollm2.sampling(temperature=0, max_new_tokens=24))
    for _ in stream_sequences(smollm2.model, seqs, draft=smollm2.model, draft_tokens=4, adaptive=False):
        pass
    assert [s.output_ids for s in seqs] == [c.token_ids for c in plain[:2]]


def test_draft_length_cost_model_prefers_plain_decoding_at_low_acceptance():
    for accept, best in ((0.05, 0), (0.95, 8)):
        assert speculative.DraftLength(8, prior=accept).choose(room=100) == best
