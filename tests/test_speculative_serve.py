"""The server with --draft: batched requests give the tokens and log-probabilities of plain decoding (greedy), the
metrics report drafted and accepted tokens, and a bad draft option stops the server with one line."""

from __future__ import annotations

import re

import pytest

from conftest import tiny_llm
from scratchlm.serve.engine import Engine, GenerationJob
from test_serve_support import run_jobs

pytestmark = pytest.mark.usefixtures("one_thread")


def copying_jobs(llm, count: int):
    """Jobs over prompts that repeat themselves (so prompt lookup drafts): greedy but for every sixth, some with
    logprobs, penalties or stop strings."""
    jobs = []
    for i in range(count):
        unit = [(5 * i + 3 * j) % 250 for j in range(2 + i % 5)]
        prompt = (unit * 12)[: 8 + (i * 13) % 60]
        settings = dict(temperature=0.0 if i % 6 else 0.9, seed=i, max_new_tokens=6 + (i * 5) % 20)
        if i % 3 == 1:
            settings["repetition_penalty"] = 1.2
        if i % 4 == 2:
            settings["stop"] = ("e",)
        params = llm.sampling(**settings)
        jobs.append(GenerationJob(prompt, params, params.max_new_tokens, index=i, logprobs=2 if i % 2 else None))
    return jobs


def metric(engine: Engine, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", engine.metrics.render(), re.M).group(1))


@pytest.mark.parametrize("draft", ["ngram", "model"])
def test_speculative_server_gives_the_same_tokens_and_logprobs_as_plain_decoding(draft):
    llm = tiny_llm(seed=3)
    jobs = copying_jobs(llm, 12)
    plain = Engine(llm, max_batch=4, prefill_chunk=16).start()
    try:
        want = run_jobs(plain, jobs)
    finally:
        plain.stop()
    engine = Engine(llm, max_batch=4, prefill_chunk=16, draft="ngram" if draft == "ngram" else tiny_llm(seed=3),
                    draft_tokens=4)
    if draft == "model":
        engine.drafter.draft_cost = 0.0  # the model drafting for itself: free, so that it always drafts
    engine.start()
    try:
        got = run_jobs(engine, jobs)
    finally:
        engine.stop()
    for job in jobs:
        a, b = got[job.index], want[job.index]
        if job.params.greedy:
            assert (a["text"], a["finish_reason"], a["completion_tokens"]) == \
                (b["text"], b["finish_reason"], b["completion_tokens"]), job.index
        else:  # sampled: another draw from the same distribution (tests/test_speculative.py checks the law)
            assert a["finish_reason"] in ("stop", "length") and a["completion_tokens"] > 0
            continue
        assert len(a["logprobs"]) == (a["completion_tokens"] if job.logprobs else 0)
        for x, y in zip(a["logprobs"], b["logprobs"]):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
    drafted, accepted = metric(engine, "scratchlm_draft_tokens_total"), metric(engine,
                                                                               "scratchlm_draft_accepted_tokens_total")
    assert drafted > 0 and 0 < accepted <= drafted
    assert metric(engine, "scratchlm_speculative_tokens_total") > metric(engine, "scratchlm_speculative_passes_total")
    assert engine.stats()["active"] == 0


def test_serve_refuses_a_bad_draft_option_in_one_line(capsys, tmp_path):
    from scratchlm import cli

    for extra, fragment in ((["--draft", "ngram", "--draft-tokens", "40"], "from 1 to 32"),
                            (["--draft-tokens", "4"], "needs a drafter"),
                            (["--draft", str(tmp_path / "missing.gguf")], "missing.gguf")):
        code = cli.main(["serve", "test-model", "--port", "1", *extra])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and lines[-1].startswith("error: ") and fragment in lines[-1], lines
