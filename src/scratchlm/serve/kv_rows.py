"""The serving engine's key/value cache: memory reserved for every slot but resident only where requests reach,
and the windows of it that the compiled decode step runs on.

``lazy_kv_cache`` allocates the cache without writing it (``torch.empty``): the operating system gives a process
a page of memory when it first touches it, so a cache of 16 slots x 2,048 positions (SmolLM2 in float32: 1.5 GB)
costs only the positions requests have used (46 KB per token for SmolLM2), where a zeroed one is resident from
the start. What was never written may hold anything, NaN included, and a NaN key or value poisons attention even
where the mask hides it (0 x NaN is NaN), so ``ZeroedRows`` zeroes each row's positions before a forward pass
first reads or writes them.
"""

from __future__ import annotations

import torch

from scratchlm.model import KVCache


def lazy_kv_cache(config, batch_size: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
    """A ``KVCache`` of ``batch_size`` rows x ``max_len`` positions whose buffers are reserved, not written (use it
    with ``ZeroedRows``)."""
    cache = KVCache(config, batch_size, max_len=1, dtype=dtype, device=device)  # KVCache chooses the dtype
    shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
    cache.k = torch.empty(shape, dtype=cache.k.dtype, device=device)
    cache.v = torch.empty(shape, dtype=cache.v.dtype, device=device)
    cache.max_len = max_len
    return cache


class ZeroedRows:
    """How many leading positions of each row of a ``lazy_kv_cache`` hold finite values (zeroed or written).

    ``ensure(start, stop, positions)`` before every forward pass over rows ``start``..``stop - 1`` whose longest row
    reaches ``positions`` (the pass reads that many positions of every row in it; the mask hides those beyond a
    row's own length, but only a finite value can be hidden), and before anything is copied into a row. Every write
    then lands below its row's mark, set before it, so zeroing never erases keys and values."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.marks = [0] * cache.batch_size

    def ensure(self, start: int, stop: int, positions: int) -> None:
        positions = min(positions, self.cache.max_len)
        for row in range(start, stop):
            done = self.marks[row]
            if done < positions:
                self.cache.k[:, row, :, done:positions].zero_()
                self.cache.v[:, row, :, done:positions].zero_()
                self.marks[row] = positions


def window(cache: KVCache, rows: int, length: int) -> KVCache:
    """The first ``rows`` rows and ``length`` positions of ``cache``, sharing its memory (and strides)."""
    view = cache.rows(0, rows)
    view.k, view.v, view.max_len = view.k[..., :length, :], view.v[..., :length, :], length
    return view


def static_window(cache: KVCache, rows: int, max_rows: int) -> KVCache:
    """The view of ``cache`` that the compiled decode step runs on: the first ``rows`` rows rounded up to a power
    of two (at most ``max_rows``) and the first positions up to a power of two past the longest row (at least
    ``compiled.MIN_CACHE``). Each (rows, positions) pair is one static-shape graph, so a server compiles at most
    log2(max_batch) x log2(max_len) graphs, and a step reads only the cache positions that can be in use."""
    from scratchlm.compiled import MIN_CACHE

    bucket = 1
    while bucket < rows:
        bucket *= 2
    bucket = min(bucket, max_rows)
    length = MIN_CACHE
    while length <= int(cache.lengths[:bucket].max()):
        length *= 2
    return window(cache, bucket, min(length, cache.max_len))


def bucket_windows(cache: KVCache, max_rows: int) -> list[KVCache]:
    """The windows ``static_window`` gives first: every row bucket (1, 2, 4, ... ``max_rows``) at the shortest
    length."""
    from scratchlm.compiled import MIN_CACHE

    windows, rows = [], 1
    while True:
        windows.append(window(cache, min(rows, max_rows), min(MIN_CACHE, cache.max_len)))
        if rows >= max_rows:
            return windows
        rows *= 2
