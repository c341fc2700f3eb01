"""The server with --context-shift: a request runs past its slot's window as ``generate`` does. Each token after a
shift is the one a fresh forward pass over the shifted sequence chooses (through the real HTTP server, streamed and
not), rows batched together each give what they give alone, and a shifted row never lends its moved keys and values
to a request that shares its prompt."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from conftest import tiny_llm
from scratchlm.serve.app import create_app
from scratchlm.serve.background import BackgroundServer, free_port
from scratchlm.serve.engine import Engine, GenerationJob
from test_context_shift import replay
from test_serve_support import run_jobs
from test_speculative_serve import metric

pytestmark = pytest.mark.usefixtures("one_thread")
KEEP = 5
WINDOW = 128  # the tiny model's context: the engine's slots hold this many tokens


@pytest.fixture(scope="module")
def llm():
    return tiny_llm("llama", seed=11)


@pytest.fixture(scope="module")
def server(llm):
    app = create_app(llm, max_batch=4, prefill_chunk=32, context_shift="recompute", keep=KEEP)
    with BackgroundServer(app) as url:
        yield url


def token_ids(llm, logprobs: dict) -> list[int]:
    """The token ids behind a /v1/completions logprobs block (each token's text is unique in the byte vocabulary:
    checked)."""
    texts = {}
    for i in range(llm.config.vocab_size):
        raw = llm.tokenizer.bytes_of(i)
        try:
            texts[raw.decode("utf-8")] = i
        except UnicodeDecodeError:
            texts["bytes:" + "".join(f"\\x{b:02x}" for b in raw)] = i
    assert len(texts) == llm.config.vocab_size
    return [texts[t] for t in logprobs["tokens"]]


def complete(url: str, prompt: list[int], max_tokens: int, **extra) -> dict:
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            **extra}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_tokens_after_a_shift_equal_a_fresh_forward_over_the_shifted_sequence(server, llm):
    prompt = prompt_of(20, 0)
    answer = complete(server, prompt, 300, logprobs=0)  # 300 > the 128-token window: three shifts
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 300
    output = token_ids(llm, choice["logprobs"])
    fresh = replay(llm, prompt, output, WINDOW, keep=KEEP)
    assert [int(x.argmax()) for x in fresh] == output
    # Streamed: the same text, and `length` only at the requested limit.
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 300, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text, reasons = "", []
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = httpx.Response(200, content=line[6:]).json()["choices"][0]
                text += chunk["text"]
                reasons.append(chunk["finish_reason"])
    assert text == choice["text"] and reasons[-1] == "length" and set(reasons[:-1]) == {None}


def test_rows_batched_together_give_what_each_gives_alone(server, llm):
    # Prompts of other lengths fill their windows (and shift) at other steps; the short one never shifts.
    requests = [(prompt_of(60, 1), 200), (prompt_of(9, 2), 230), (prompt_of(33, 3), 160), (prompt_of(7, 4), 40)]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: complete(server, *r)["choices"][0], requests))
    for (prompt, n), got in zip(requests, together):
        want = llm.complete(prompt, temperature=0, max_new_tokens=n, ignore_eos=True, context_shift=True, keep=KEEP)
        assert got["text"] == want.text and got["finish_reason"] == "length"


def test_a_shifted_row_lends_no_keys_to_a_request_with_the_same_prompt(llm):
    """A joiner that shares the prompt of a running, shifted request computes its own prompt (or takes prompt blocks
    the prefix cache stored before the shift) and gets exactly what it gets alone."""
    prompt = prompt_of(40, 5)  # not a whole number of 16-token blocks: a running row would lend more than the cache
    engine = Engine(llm, max_batch=2, prefill_chunk=64, context_shift="recompute", keep=KEEP).start()
    try:
        shifted, tokens = threading.Event(), [0]

        def sink(event):
            tokens[0] += len(event.logprobs)
            if tokens[0] > WINDOW - len(prompt) + 8:  # past the first shift
                shifted.set()

        long = llm.sampling(temperature=0, max_new_tokens=2000, ignore_eos=True)
        ticket = engine.submit([GenerationJob(prompt, long, 2000, index=0, logprobs=0)], sink)
        assert shifted.wait(60)
        joiner = prompt + prompt_of(3, 6)
        params = llm.sampling(temperature=0, max_new_tokens=30, ignore_eos=True)
        got = run_jobs(engine, [GenerationJob(joiner, params, 30, index=1)])[1]
        engine.cancel(ticket)
    finally:
        engine.stop()
    want = llm.complete(joiner, temperature=0, max_new_tokens=30, ignore_eos=True)
    assert got["text"] == want.text


@pytest.mark.parametrize("mode", ["rotate", "recompute"])
def test_the_engine_shifts_with_a_draft_model_and_rotation_as_generate_does(llm, mode):
    prompts = [prompt_of(50, 7), prompt_of(12, 8)]
    jobs = [GenerationJob(p, llm.sampling(temperature=0, max_new_tokens=180, ignore_eos=True), 180, index=i)
            for i, p in enumerate(prompts)]
    engine = Engine(llm, max_batch=2, prefill_chunk=64, context_shift=mode, keep=3, draft=tiny_llm("llama", seed=11),
                    draft_tokens=3)
    engine.drafter.draft_cost = 0.0  # the model drafting for itself: free, so that it always drafts
    engine.start()
    try:
        got = run_jobs(engine, jobs)
    finally:
        engine.stop()
    want = llm.complete(prompts, temperature=0, max_new_tokens=180, ignore_eos=True, context_shift=mode, keep=3)
    assert [got[i]["text"] for i in range(2)] == [c.text for c in want]
    assert metric(engine, "scratchlm_draft_accepted_tokens_total") > 0


def test_without_the_flag_the_window_still_limits_a_request(llm):
    app = create_app(llm, max_batch=2)
    with BackgroundServer(app) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny-llama", "prompt": prompt_of(20, 0),
                                                       "max_tokens": 300}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_serve_refuses_bad_shift_options_in_one_line(capsys):
    from scratchlm import cli

    for extra, fragment in ((["--keep", "-1"], "--keep -1 must be 0 or more"),
                            (["--keep", "600"], "more than half")):
        code = cli.main(["serve", "test-model", "--port", str(free_port()), *extra])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and lines[-1].startswith("error: ") and fragment in lines[-1], lines
