"""Prefix caching in the server: a block tree of keys and values that later requests copy instead of recomputing.
Results must equal those computed from scratch, only whole cached blocks are reused, the memory budget holds by
evicting least recently used leaves, and the API reports ``usage.prompt_tokens_details.cached_tokens``."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from conftest import tiny_config, tiny_llm
from scratchlm.errors import ConfigError
from scratchlm.serve.app import create_app
from scratchlm.serve.background import BackgroundServer
from scratchlm.serve.engine import Engine, GenerationJob
from scratchlm.serve.prefix_cache import PrefixCache
from test_serve_support import run_jobs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm():
    return tiny_llm("llama", seed=11)


def kv_row(config, tokens: list[int], length: int = 128):
    """A fake slot row whose keys and values at position p encode the token at p (to see what was copied)."""
    k = torch.zeros(config.n_layers, config.n_kv_heads, length, config.head_dim)
    k[:, :, : len(tokens)] = torch.tensor(tokens, dtype=torch.float32)[None, None, :, None]
    return k, -k


def test_longest_prefix_is_found_block_by_block_and_copied_back():
    cfg = tiny_config()
    cache = PrefixCache(cfg, budget_mb=1, block_size=4)
    a = list(range(10))  # blocks [0..3], [4..7]; the 2 tokens after them are not a full block
    cache.store(a, *kv_row(cfg, a))
    assert len(cache) == 2
    assert [b.tokens for b in cache.match(a + [99])] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert len(cache.match([0, 1, 2, 3, 4, 5, 9, 7])) == 1  # the second block differs
    assert cache.match([1, 2, 3, 4]) == []  # a block is found only after the same blocks before it
    assert cache.match(a, namespace="adapter") == []  # another adapter's keys differ: its own tree
    k, v = torch.zeros(cfg.n_layers, cfg.n_kv_heads, 16, cfg.head_dim), torch.zeros(
        cfg.n_layers, cfg.n_kv_heads, 16, cfg.head_dim)
    cache.load(cache.match(a), k, v, 7)
    assert k[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 5, 6] + [0] * 9
    assert torch.equal(v, -k)
    assert cache.store(a + [10, 11], *kv_row(cfg, a + [10, 11])) == 1  # only the new third block is copied


def test_budget_evicts_least_recently_used_leaves_only():
    cfg = tiny_config()
    block = PrefixCache(cfg, budget_mb=1, block_size=4).block_bytes
    cache = PrefixCache(cfg, budget_mb=3 * block / 2**20, block_size=4)
    assert cache.capacity == 3
    first, second = [1] * 8, [2] * 4
    cache.store(first, *kv_row(cfg, first))  # two blocks: a chain
    cache.store(second, *kv_row(cfg, second))
    cache.match(first)  # first's chain is now more recent than second
    third = [3] * 4
    cache.store(third, *kv_row(cfg, third))
    assert cache.match(second) == []  # the least recently used leaf went
    assert len(cache.match(first)) == 2 and len(cache) == 3 and cache.bytes_used == 3 * block
    cache.store([4] * 4, *kv_row(cfg, [4] * 4))
    # third was the oldest leaf; first's root block is older but still extended by its second block, so it stays
    # until its leaf goes.
    assert cache.match(third) == [] and len(cache.match(first)) == 2


def test_a_budget_too_small_for_one_block_is_a_clear_error(llm):
    with pytest.raises(ConfigError, match=r"--prefix-cache-mb 0\.001 holds no block of 16 tokens .* or 0 to turn"):
        Engine(llm, prefix_cache_mb=0.001)
    assert Engine(llm, prefix_cache_mb=0).prefix_cache is None


def spy_prefill(llm, calls: list):
    original = llm.model.hidden_states

    def spy(ids, cache=None, rows=None, input_lengths=None):
        if ids.shape[1] > 1:
            calls.extend(input_lengths.tolist() if input_lengths is not None else [ids.shape[1]])
        return original(ids, cache, rows, input_lengths)

    llm.model.hidden_states = spy


SYSTEM = [(5 * j + 1) % 250 for j in range(50)]  # 3 whole blocks of 16 and 2 tokens


def test_a_later_request_prefills_only_what_the_cache_lacks_and_gets_the_same_result(llm):
    settings = dict(temperature=0.8, max_new_tokens=8)
    prompts = [SYSTEM + [60 + i, 61, 62 + i] for i in range(3)]
    results, calls = [], []
    spy_prefill(llm, calls)
    try:
        for mb in (64, 0):
            engine = Engine(llm, max_batch=2, prefix_cache_mb=mb).start()
            try:  # one after the other: nothing shares a running row, only the cache can help
                results.append([run_jobs(engine, [GenerationJob(p, llm.sampling(seed=i, **settings), 8)])[0]
                                for i, p in enumerate(prompts)])
                if mb:
                    cached = engine.prefix_cache
            finally:
                engine.stop()
    finally:
        del llm.model.hidden_states
    assert calls == [53, 5, 5, 53, 53, 53]  # with the cache: 48 tokens copied, 5 computed
    assert cached.hits == 96
    with_cache, without = results
    for i, p in enumerate(prompts):
        reference = llm.complete([p], seed=i, **settings)[0]
        assert with_cache[i]["text"] == without[i]["text"] == reference.text


def events_of(engine, job: GenerationJob) -> list:
    """Every event of one job, once it has finished."""
    events, done = [], threading.Event()

    def sink(event):
        events.append(event)
        if event.finish_reason is not None:
            done.set()

    engine.submit([job], sink)
    assert done.wait(60)
    return events


def test_a_chats_next_turn_reuses_the_previous_prompt(llm):
    """Turn 2 starts with turn 1's prompt: its blocks are reused. The reply's keys and values are not kept (decode
    steps compute them with other rounding than a prefill), so turn 2 gets exactly what it gets with the cache off."""
    engine = Engine(llm, max_batch=2, prefix_cache_mb=64).start()
    reply = llm.complete([SYSTEM], temperature=0, max_new_tokens=30)[0]
    turn2 = SYSTEM + list(reply.token_ids) + [7, 8, 9]
    try:
        first = events_of(engine, GenerationJob(SYSTEM, llm.sampling(temperature=0, max_new_tokens=30), 30))
        second = events_of(engine, GenerationJob(turn2, llm.sampling(temperature=0, max_new_tokens=5), 5))
    finally:
        engine.stop()
    assert "".join(e.text for e in first) == reply.text and first[-1].cached_tokens == 0
    assert second[-1].cached_tokens == 48  # the three whole blocks of turn 1's prompt
    assert "".join(e.text for e in second) == llm.complete([turn2], temperature=0, max_new_tokens=5)[0].text


def test_usage_reports_cached_prompt_tokens(llm):
    app = create_app(llm, max_batch=2, prefix_cache_mb=64)
    body = {"model": llm.name, "prompt": SYSTEM, "max_tokens": 3, "temperature": 0}
    with BackgroundServer(app) as url:
        cold = httpx.post(url + "/v1/completions", json=body).json()
        warm = httpx.post(url + "/v1/completions", json={**body, "n": 2}).json()
        streamed = httpx.post(url + "/v1/completions", json={**body, "stream": True,
                                                             "stream_options": {"include_usage": True}})
    assert cold["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert warm["usage"]["prompt_tokens_details"] == {"cached_tokens": 48}
    assert warm["choices"][0]["text"] == warm["choices"][1]["text"] == cold["choices"][0]["text"]
    assert '"prompt_tokens_details": {"cached_tokens": 48}' in streamed.text


def test_serve_flag_default_is_the_engines():
    from scratchlm.cli import build_parser
    from scratchlm.serve import prefix_cache

    args = build_parser().parse_args(["serve", "m"])
    assert args.prefix_cache_mb == prefix_cache.DEFAULT_BUDGET_MB
    assert build_parser().parse_args(["serve", "m", "--prefix-cache-mb", "0"]).prefix_cache_mb == 0


def test_the_server_reports_a_budget_too_small_for_one_block(llm):
    """The CLI raises what ``on_load_error`` receives as one line (tests/test_serve_cli.py checks that path)."""
    errors = []
    app = create_app(llm, prefix_cache_mb=0.001, on_load_error=errors.append)
    with BackgroundServer(app, wait_ready=False) as url:
        deadline = time.monotonic() + 60
        while not errors and time.monotonic() < deadline:
            time.sleep(0.02)
        health = httpx.get(url + "/health")
    assert isinstance(errors[0], ConfigError) and "holds no block of 16 tokens" in str(errors[0])
    assert health.status_code == 503 and "holds no block" in health.json()["error"]["message"]
