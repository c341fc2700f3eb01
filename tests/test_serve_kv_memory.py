"""The serving engine's key/value cache (``serve/kv_rows.py``): it starts as zeros that cost no memory, is resident
only where requests write, and every request still gets its own result with prefixes copied between rows and
the prefix cache on. And the compiled decode step's packages: asked for in the background at start, one per
row bucket."""

from __future__ import annotations

import ctypes
import fcntl
import json
import mmap

import pytest
import torch

from conftest import tiny_llm
from scratchlm import aot_background
from scratchlm.compile_cache import cache_dir
from scratchlm.compiled import compile_decoding
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
def test_the_cache_starts_as_zeros_that_cost_no_memory_and_each_request_gets_its_own_result(shared):
    llm = tiny_llm("llama", seed=5, context_length=256)
    jobs, refs = jobs_and_references(llm, 12, shared)
    engine = Engine(llm, max_batch=4, prefill_chunk=16, prefix_cache_mb=1)
    # Attention reads never-written positions behind the mask, and only a finite value can be hidden there:
    # they read as zeros, and (an anonymous memory map) none of them is resident before it is written.
    assert resident_bytes(engine.cache.k) + resident_bytes(engine.cache.v) <= 2 * mmap.PAGESIZE
    assert not engine.cache.k.any() and not engine.cache.v.any()
    engine.start()
    try:
        results = run_jobs(engine, jobs)
    finally:
        engine.stop()
    for job, ref in zip(jobs, refs):
        assert results[job.index]["text"] == ref.text, job.index
    if shared:
        assert engine.metrics.reused_tokens.values[()] > 0  # prefixes were copied into fresh rows


def resident_bytes(tensor: torch.Tensor) -> int:
    """How many bytes of the pages under ``tensor``'s buffer the kernel has made resident (``mincore(2)``): the
    cache's own memory, not the process's whole resident set, which the allocator's retained scratch inflates."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    stop = -(-(tensor.data_ptr() + tensor.nbytes) // page) * page
    flags = (ctypes.c_ubyte * ((stop - start) // page))()
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), flags) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(flag & 1 for flag in flags) * page


def test_cache_memory_is_resident_only_for_the_positions_requests_reach():
    # 16 slots x 4,096 positions x 4 layers x 2 heads x 32 x 4 bytes x (keys + values) = 128 MiB reserved
    llm = tiny_llm("llama", seed=5, context_length=4096, d_model=64, n_layers=4, n_heads=2, n_kv_heads=2)
    params = llm.sampling(temperature=0.0, max_new_tokens=4)
    jobs = [GenerationJob(list(range(1, 30)), params, 4, index=i) for i in range(16)]
    engine = Engine(llm, max_batch=16, max_len=4096, prefix_cache_mb=0)
    reserved = engine.cache.k.nbytes + engine.cache.v.nbytes
    assert reserved == 128 * 2**20
    engine.start()
    try:
        run_jobs(engine, jobs)
    finally:
        engine.stop()
    resident = resident_bytes(engine.cache.k) + resident_bytes(engine.cache.v)
    # 33 positions of 4,096 used in each row (a page of 4 KiB holds 32 of them per layer and head): 2 pages of
    # each of 16 rows x 4 layers x 2 heads, keys and values: 2 MiB (a zeroed cache would be 128 MiB)
    assert 0 < resident <= 4 * 2**20, f"{resident / 2**20:.1f} MiB resident for a {reserved / 2**20:.0f} MiB cache"
    assert torch.isfinite(engine.cache.k[:, :, :, :33]).all()


def test_the_server_asks_for_every_row_bucket_in_the_background_and_decodes_meanwhile(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # compile_cache.prepare sets it
    llm = tiny_llm("llama", seed=5, context_length=512)
    jobs, refs = jobs_and_references(llm, 6)
    # --compile: a decoder that would build a missing package in the foreground and wait for it
    decoder = compile_decoding(llm.model, recipe={"name_or_path": str(tmp_path / "model")}, background=False)
    directory = cache_dir(llm.model)
    directory.mkdir(parents=True)
    with open(directory / aot_background.LOCK, "a") as lock:
        # A worker holds the build lock (a real build takes minutes): requests are written, no worker starts.
        fcntl.flock(lock, fcntl.LOCK_EX)
        engine = Engine(llm, max_batch=6, prefill_chunk=16).start()
        try:
            results = run_jobs(engine, jobs)
        finally:
            engine.stop()
    assert decoder.background  # the server never waits for the compiler
    asked = sorted(json.loads(p.read_text())["layout"][:2] for p in (directory / aot_background.REQUESTS).iterdir())
    # row buckets 1, 2, 4 and the cache's 6 rows (static_window), each at the shortest window (256 positions)
    assert asked == [[1, 256], [2, 256], [4, 256], [6, 256]]
    assert not list(directory.glob("*.pt2"))
    for job, ref in zip(jobs, refs):  # decoded eagerly meanwhile: each request's own result
        assert results[job.index]["text"] == ref.text, job.index
