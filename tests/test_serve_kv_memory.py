"""The serving engine's key/value cache: memory is touched only where requests reach, and what was never written
(``torch.empty`` may hold NaN) never reaches attention, with prefixes copied between rows and the prefix cache on."""

from __future__ import annotations

import psutil
import pytest
import torch

from conftest import tiny_llm
from scratchlm.serve.engine import Engine, GenerationJob
from test_serve_support import run_jobs

pytestmark = pytest.mark.usefixtures("one_thread")


def jobs_and_references(llm, count: int, shared: int = 0):
    """Greedy and sampled jobs with prompts of 3 to 40 tokens (the first ``shared`` tokens common to all) and what
    each gives alone."""
    jobs, refs = [], []
    for i in range(count):
        prompt = [5 + j % 7 for j in range(shared)] + [(11 * i + 5 * j) % 250 for j in range(3 + (i * 13) % 38)]
        settings = dict(temperature=0.0 if i % 2 else 0.9, seed=i, max_new_tokens=4 + (i * 5) % 12)
        params = llm.sampling(**settings)
        jobs.append(GenerationJob(prompt, params, params.max_new_tokens, index=i))
        refs.append(llm.complete([prompt], **settings)[0])
    return jobs, refs


@pytest.mark.parametrize("shared", [0, 20])
def test_garbage_in_never_written_cache_memory_does_not_reach_attention(shared):
    llm = tiny_llm("llama", seed=5, context_length=256)
    jobs, refs = jobs_and_references(llm, 12, shared)
    engine = Engine(llm, max_batch=4, prefill_chunk=16, prefix_cache_mb=1)
    # What torch.empty hands out may be anything; NaN is the worst case (0 * NaN is NaN behind any mask).
    engine.cache.k.fill_(float("nan"))
    engine.cache.v.fill_(float("nan"))
    engine.start()
    try:
        results = run_jobs(engine, jobs)
    finally:
        engine.stop()
    for job, ref in zip(jobs, refs):
        assert results[job.index]["text"] == ref.text, job.index
    if shared:
        assert engine.metrics.reused_tokens.values[()] > 0  # prefixes were copied into fresh rows


def test_cache_memory_is_resident_only_for_the_positions_requests_reach():
    # 16 slots x 4,096 positions x 4 layers x 2 heads x 32 x 4 bytes x (keys + values) = 128 MiB reserved
    llm = tiny_llm("llama", seed=5, context_length=4096, d_model=64, n_layers=4, n_heads=2, n_kv_heads=2)
    process = psutil.Process()
    before = process.memory_info().rss
    engine = Engine(llm, max_batch=16, max_len=4096, prefix_cache_mb=0)
    reserved = engine.cache.k.nbytes + engine.cache.v.nbytes
    assert reserved == 128 * 2**20
    engine.start()
    try:
        params = llm.sampling(temperature=0.0)
        run_jobs(engine, [GenerationJob(list(range(1, 30)), params, 8, index=i) for i in range(16)])
    finally:
        engine.stop()
    grown = process.memory_info().rss - before
    # 37 positions of 4,096 used in each row (a page of 4 KiB holds 32 of them per layer and head): about 2 MiB
    assert grown < reserved / 8, f"{grown / 2**20:.0f} MiB resident for a {reserved / 2**20:.0f} MiB cache"
    assert torch.isfinite(engine.cache.k[:, :, :, :37]).all()
