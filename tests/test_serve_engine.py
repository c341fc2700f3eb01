"""The batching scheduler on its own (no HTTP): results equal each request run alone, prompt scoring equals a
direct forward pass, prefill is chunked between decode steps, slots are freed, the queue is bounded."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import tiny_llm
from scratchlm.serve.engine import Engine, GenerationJob, QueueFullError
from test_serve_support import run_jobs


@pytest.fixture(scope="module")
def llm():
    return tiny_llm("llama", seed=3)


SETTINGS = [
    dict(temperature=0.0),
    dict(temperature=0.9, seed=1),
    dict(temperature=1.0, seed=2, top_k=20),
    dict(temperature=0.8, seed=3, top_p=0.9),
    dict(temperature=1.2, seed=4, min_p=0.05),
    dict(temperature=0.7, seed=5, presence_penalty=1.5, frequency_penalty=0.5),
    dict(temperature=0.0, repetition_penalty=1.3),
    dict(temperature=1.0, seed=6, stop=("e", "a")),
]


def jobs_and_references(llm, count: int):
    """Jobs with varied prompts (1 to 90 tokens) and settings, and what each gives when run alone."""
    jobs, refs = [], []
    for i in range(count):
        prompt = [(7 * i + 3 * j) % 250 for j in range(1 + (i * 37) % 90)]
        settings = dict(SETTINGS[i % len(SETTINGS)], max_new_tokens=5 + (i * 7) % 20)
        params = llm.sampling(**settings)
        jobs.append(GenerationJob(prompt, params, params.max_new_tokens, index=i))
        refs.append(llm.complete([prompt], **settings)[0])
    return jobs, refs


def test_batched_requests_give_the_same_results_as_each_alone(llm):
    jobs, refs = jobs_and_references(llm, 24)
    # 4 slots for 24 jobs: requests keep joining and leaving; 16-token chunks split the long prompts.
    engine = Engine(llm, max_batch=4, max_queue=64, prefill_chunk=16).start()
    try:
        results = run_jobs(engine, jobs[:10])
        # A second wave arrives while the first is still running.
        second = threading.Thread(target=lambda: results.update(run_jobs(engine, jobs[10:])))
        second.start()
        second.join()
    finally:
        engine.stop()
    for job, ref in zip(jobs, refs):
        got = results[job.index]
        assert got["text"] == ref.text, (job.index, job.params)
        assert got["finish_reason"] == ref.finish_reason
        # completion_tokens counts every sampled token, an end-of-sequence token included (without stop
        # strings, "stop" means the model ended on one).
        assert got["completion_tokens"] >= len(ref.token_ids)
        if not job.params.stop:
            assert got["completion_tokens"] == len(ref.token_ids) + (ref.finish_reason == "stop")
        assert got["prompt_tokens"] == len(job.prompt_ids)
    assert engine.stats()["active"] == 0


def test_decode_runs_all_requests_in_one_forward_and_prefill_is_chunked_between_decode_steps(llm):
    calls = []
    original = llm.model.hidden_states

    def spy(ids, cache=None, rows=None, input_lengths=None):
        calls.append(("decode" if ids.shape[1] == 1 else "prefill", tuple(ids.shape)))
        return original(ids, cache, rows, input_lengths)

    engine = Engine(llm, max_batch=4, prefill_chunk=16)
    llm.model.hidden_states = spy
    try:
        engine.start()
        short = [GenerationJob([1, 2, 3], llm.sampling(temperature=0, max_new_tokens=40, ignore_eos=True), 40,
                               index=i) for i in range(3)]
        got = {}
        running = threading.Thread(target=lambda: got.update(run_jobs(engine, short)))
        running.start()
        deadline = time.monotonic() + 60
        while not any(c == ("decode", (3, 1)) for c in calls):  # the three short requests decode together
            assert time.monotonic() < deadline
            time.sleep(0.001)
        long_job = GenerationJob(list(range(100)), llm.sampling(temperature=0, max_new_tokens=2), 2, index=9)
        run_jobs(engine, [long_job])
        running.join()
    finally:
        engine.stop()
        del llm.model.hidden_states
    assert {c[1] for c in calls if c[0] == "decode"} >= {(3, 1)}  # one forward for all three
    # The 100-token prompt went in as 7 chunks of at most 16 tokens, each followed by a decode step of the
    # running requests: they kept streaming while it was prefilled.
    long_chunks = [i for i, c in enumerate(calls) if c[0] == "prefill" and c[1][1] > 3]
    assert len(long_chunks) == 7 and all(calls[i][1][1] <= 16 for i in long_chunks)
    for a, b in zip(long_chunks, long_chunks[1:]):
        assert any(c[0] == "decode" for c in calls[a + 1: b])
    assert all(r["completion_tokens"] == 40 for r in got.values())


def test_prompt_logprobs_equal_a_direct_forward_pass(llm):
    prompt = [(5 * j + 1) % 256 for j in range(50)]
    engine = Engine(llm, max_batch=2, prefill_chunk=16).start()
    try:
        job = GenerationJob(prompt, llm.sampling(temperature=0, max_new_tokens=1), 1, logprobs=3,
                            prompt_logprobs=True)
        scoring_only = GenerationJob(prompt, llm.sampling(temperature=0, max_new_tokens=1), 0, index=1,
                                     logprobs=1, prompt_logprobs=True)
        got = run_jobs(engine, [job, scoring_only])
    finally:
        engine.stop()
    with torch.no_grad():
        direct = llm.model(torch.tensor([prompt]))[0].float().log_softmax(-1)  # (T, V)
    entries = got[0]["prompt_logprobs"]
    assert entries[0].token_id == prompt[0] and entries[0].logprob is None and len(entries) == len(prompt)
    expected = direct[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(torch.tensor([e.logprob for e in entries[1:]]), expected, atol=1e-4, rtol=0)
    for p, e in enumerate(entries[1:]):
        assert e.token_id == prompt[p + 1] and len(e.top) == 3
        assert e.top[0][1] == pytest.approx(float(direct[p].max()), abs=1e-4)
        assert e.top[0][0] == int(direct[p].argmax())
    generated = got[0]["logprobs"][0]
    assert generated.token_id == int(direct[-1].argmax())  # greedy picks the best token, scored the same way
    assert generated.logprob == pytest.approx(float(direct[-1].max()), abs=1e-4)
    assert got[1]["completion_tokens"] == 0 and got[1]["text"] == "" and got[1]["finish_reason"] == "length"
    assert [e.logprob for e in got[1]["prompt_logprobs"][1:]] == pytest.approx(expected.tolist(), abs=1e-4)


def test_embeddings_are_normalised_mean_pooled_hidden_states(llm):
    inputs = [[1, 2, 3], list(range(40)), [9], list(range(100, 130))]
    engine = Engine(llm, prefill_chunk=32).start()
    done = threading.Event()
    result = []
    try:
        engine.embed(inputs, lambda vectors: (result.append(vectors), done.set()))
        assert done.wait(60)
    finally:
        engine.stop()
    with torch.no_grad():
        for ids, vector in zip(inputs, result[0]):
            direct = llm.model.hidden_states(torch.tensor([ids]))[0].mean(0)
            torch.testing.assert_close(vector, direct / direct.norm(), atol=1e-5, rtol=1e-4)
            assert float(vector.norm()) == pytest.approx(1.0, abs=1e-5)


def test_cancelled_request_frees_its_slot_at_the_next_step(llm):
    engine = Engine(llm, max_batch=2).start()
    first = threading.Event()
    events = []
    try:
        job = GenerationJob([1, 2], llm.sampling(temperature=0, max_new_tokens=120, ignore_eos=True), 120)
        ticket = engine.submit([job], lambda e: (events.append(e), first.set()))
        assert first.wait(30)
        engine.cancel(ticket)
        deadline = time.monotonic() + 30
        while engine.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.stats()["active"] == 0
        assert not any(e.finish_reason for e in events)  # it was stopped, not finished
        assert engine.cache.lengths.tolist() == [0, 0]
    finally:
        engine.stop()


def test_queue_is_bounded():
    llm = tiny_llm()
    engine = Engine(llm, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    job = GenerationJob([1], llm.sampling(max_new_tokens=1), 1)
    engine.submit([job], lambda e: None)  # takes the free slot's place
    engine.submit([job], lambda e: None)  # waits in the queue
    with pytest.raises(QueueFullError):
        engine.submit([job], lambda e: None)


def test_joint_prefill_never_runs_past_the_cache():
    """A request deep into its prompt and one just starting must not share a padded batch that would write
    beyond the cache (a bug the API fuzzer found)."""
    llm = tiny_llm(context_length=64)
    params = llm.sampling(temperature=0, max_new_tokens=3)
    jobs = [GenerationJob(list(range(60)), params, 3, index=0), GenerationJob(list(range(40)), params, 3, index=1)]
    engine = Engine(llm, max_batch=3, prefill_chunk=48).start()
    first = threading.Event()
    try:
        # A request that keeps decoding holds the prefill budget at 48 tokens per step, so the 60-token prompt
        # is half done when the 40-token one starts.
        busy = GenerationJob([1], llm.sampling(temperature=0, max_new_tokens=40, ignore_eos=True), 40, index=5)
        ticket = engine.submit([busy], lambda e: first.set())
        assert first.wait(30)
        got = run_jobs(engine, jobs)
        engine.cancel(ticket)
    finally:
        engine.stop()
    for job in jobs:
        assert got[job.index]["text"] == llm.complete([job.prompt_ids], temperature=0, max_new_tokens=3)[0].text


def test_shared_prompt_prefix_is_copied_not_recomputed(llm):
    """Requests that share a long prefix (a system prompt) copy its keys and values from the request that
    computed them, prefill only their own remainder, and still get exactly what they would get alone."""
    prefix = [(3 * j + 5) % 250 for j in range(40)]
    prompts = [prefix + [100 + i, 7, 8 + i] for i in range(5)]
    calls = []
    original = llm.model.hidden_states

    def spy(ids, cache=None, rows=None, input_lengths=None):
        if ids.shape[1] > 1:
            calls.append(input_lengths.tolist() if input_lengths is not None else [ids.shape[1]])
        return original(ids, cache, rows, input_lengths)

    settings = dict(temperature=0.9, max_new_tokens=6)
    jobs = [GenerationJob(p, llm.sampling(seed=i, **settings), 6, index=i) for i, p in enumerate(prompts)]
    engine = Engine(llm, max_batch=8)
    llm.model.hidden_states = spy
    try:
        engine.start()
        got = run_jobs(engine, jobs)
    finally:
        engine.stop()
        del llm.model.hidden_states
    prefilled = sorted(n for call in calls for n in call)
    assert prefilled == [3, 3, 3, 3, 43]  # the first computes the whole prompt, the others 3 tokens each
    assert "scratchlm_prefix_reused_tokens_total 160" in engine.metrics.render()
    for i, p in enumerate(prompts):
        assert got[i]["text"] == llm.complete([p], seed=i, **settings)[0].text
