"""lm-evaluation-harness on scratchlm models, three ways, against lm-eval's own ``hf`` backend on our HF export:

    (a) lm-eval's ``local-completions`` against ``scratchlm serve`` (the OpenAI /v1/completions route),
    (b) the in-process backend ``--model scratchlm`` (scratchlm.eval.harness),
    (c) lm-eval's ``hf`` backend (HF transformers) on the same weights exported with ``export_hf``.

Every per-sample log-likelihood agrees within 1e-4 (tiny model) or 1e-3 (SmolLM2), so the accuracies are
the same; rolling log-likelihoods equal ``scratchlm eval perplexity`` on the same windows. The tasks are the
offline ones shipped in ``scratchlm/eval/tasks`` (no network).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402

from export_helpers import export_llm  # noqa: E402
from scratchlm.eval import harness  # noqa: E402
from scratchlm.eval.perplexity import perplexity  # noqa: E402
from scratchlm.formats.export_hf import export_hf  # noqa: E402
from scratchlm.llm import LLM  # noqa: E402
from scratchlm.serve.app import create_app  # noqa: E402
from scratchlm.serve.background import BackgroundServer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
logging.getLogger("lm_eval").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return export_hf(export_llm("llama", seed=3, context_length=512), tmp_path_factory.mktemp("harness") / "tiny")


def loglikelihoods(results: dict, task: str) -> list[list[float]]:
    """Per document (in document order), the log-likelihood of each choice."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def run_three_ways(path, tasks: list[str], limit: int, max_length: int) -> dict[str, dict]:
    llm = LLM.load(path)
    ours = harness.ScratchLM(llm, progress=False)
    hf = HFLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=8, max_length=max_length)
    out = {"scratchlm": harness.evaluate(ours, tasks, limit=limit, log_samples=True),
           "hf": harness.evaluate(hf, tasks, limit=limit, log_samples=True)}
    with BackgroundServer(create_app(llm, max_batch=4)) as url:
        served = LocalCompletionsAPI(model=llm.name, base_url=url + "/v1/completions", tokenizer=str(path),
                                     tokenizer_backend="huggingface", tokenized_requests=True,
                                     max_length=max_length, num_concurrent=1, max_retries=1, batch_size=1)
        out["local-completions"] = harness.evaluate(served, tasks, limit=limit, log_samples=True)
    return out


def assert_agree(runs: dict[str, dict], tasks: list[str], tolerance: float) -> None:
    for task in tasks:
        reference = loglikelihoods(runs["hf"], task)
        assert len(reference) > 0
        for name in ("scratchlm", "local-completions"):
            ours = loglikelihoods(runs[name], task)
            assert [len(d) for d in ours] == [len(d) for d in reference]
            worst = max(abs(a - b) for da, db in zip(ours, reference) for a, b in zip(da, db))
            assert worst <= tolerance, f"{name} on {task}: log-likelihoods differ by up to {worst:.2e}"
            assert harness.scores(runs[name])[task] == pytest.approx(harness.scores(runs["hf"])[task], abs=1e-12)


def test_tiny_model_loglikelihoods_agree_three_ways(tiny_dir):
    tasks = ["scratchlm_next_line", "scratchlm_yes_no"]
    runs = run_three_ways(tiny_dir, tasks, limit=20, max_length=512)
    assert_agree(runs, tasks, 1e-4)


def test_rolling_loglikelihood_equals_perplexity_on_the_same_windows(tiny_dir):
    llm = LLM.load(tiny_dir)
    ours = harness.ScratchLM(llm, max_length=64, progress=False)
    # lm-eval's last window keeps a full window of history where a sliding window would be short: cut the
    # text where its tokens fill whole windows, so that both score every token with the same history.
    text = json.loads((harness.TASKS_DIR / "passages.jsonl").read_text(encoding="utf-8").splitlines()[0])["text"]
    text = next(text[:k] for k in range(len(text), 0, -1) if len(llm.tokenizer.encode(text[:k])) == 192)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (rolling,) = ours.loglikelihood_rolling([request], disable_tqdm=True)
    ids = [ours.prefix_token_id] + llm.tokenizer.encode(text)
    assert len(ids) == 1 + 3 * 64  # three windows
    # Windows of max_length + 1 tokens, max_length apart; the first token is predicted from the prefix token.
    reference = perplexity(llm.model, ids, context=65, stride=64)
    assert reference.tokens == len(ids) - 1
    assert -rolling == pytest.approx(reference.nll, rel=1e-5)
    hf = HFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32", batch_size=4, max_length=64)
    (hf_rolling,) = hf.loglikelihood_rolling([request], disable_tqdm=True)
    assert rolling == pytest.approx(hf_rolling, rel=1e-5)


def test_generate_until_matches_the_hf_backend(tiny_dir):
    llm = LLM.load(tiny_dir)
    requests = [Instance(request_type="generate_until", doc={}, idx=0,
                         arguments=(f"Question: What is {a} plus 3?\nAnswer:", {"until": ["\n"], "max_gen_toks": 6,
                                                                                 "do_sample": False}))
                for a in range(6)]
    ours = harness.ScratchLM(llm, progress=False).generate_until(requests, disable_tqdm=True)
    hf = HFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32", batch_size=6)
    theirs = hf.generate_until(requests, disable_tqdm=True)
    assert ours == theirs and any(ours)


def test_cli_prints_a_table_and_the_scores(tiny_dir, capsys):
    from scratchlm.cli import main

    args = ["eval", "harness", str(tiny_dir), "--tasks", "scratchlm_yes_no", "--limit", "12", "--json"]
    assert main(args) in (0, None)
    out = capsys.readouterr().out.strip().splitlines()
    printed = json.loads(out[-1])
    direct = harness.scores(harness.evaluate(harness.ScratchLM(LLM.load(tiny_dir), progress=False),
                                             ["scratchlm_yes_no"], limit=12))
    assert printed == direct
    assert out[0].split()[:3] == ["task", "metric", "value"] and "scratchlm_yes_no" in out[1]


def test_unknown_task_or_model_argument_is_a_clear_error(tiny_dir):
    from scratchlm.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown harness task"):
        harness.evaluate(harness.ScratchLM(LLM.load(tiny_dir), progress=False), ["scratchlm_no_such_task"])
    with pytest.raises(ConfigError, match="quantise"):  # --model_args pretrained=...,quantise=int4
        harness.ScratchLM(str(tiny_dir), quantise="int4")


def test_smollm2_loglikelihoods_agree_three_ways(smollm2, tmp_path):
    path = export_hf(smollm2, tmp_path / "smollm2")
    torch.set_num_threads(2)
    # Short questions with two choices: the cheapest multiple-choice task (the 135M model is slow on a CPU).
    runs = run_three_ways(path, ["scratchlm_yes_no"], limit=24, max_length=2048)
    assert_agree(runs, ["scratchlm_yes_no"], 1e-3)
