"""The serving engine's key/value cache: memory reserved for every slot but resident only where requests reach,
and the windows of it that the compiled decode step runs on.

``lazy_kv_cache`` allocates the cache as an anonymous memory map (CPU): the operating system hands out such
memory as zeros and makes a page resident only when it is first written, so a cache of 16 slots x 2,048
positions (SmolLM2 in float32: 1.5 GB) costs only the positions requests have written (46 KB per token for
SmolLM2), and the positions never written read as zeros. Zeros matter: attention reads every position of the
window it is given and the mask hides those beyond a row's length, but only a finite value can be hidden
(0 x NaN is NaN), and memory from ``torch.empty`` may hold anything. Reading a never-written page costs no
memory either (the kernel maps its one shared zero page), so the compiled step may read a whole window of
256 positions per row while only the written ones are resident. (An earlier version zeroed each row's window
before use: the server then held 191 MiB of cache for 32 short requests, 80 MiB of it written.)
"""

from __future__ import annotations

import math
import mmap

import torch

from scratchlm.model import KVCache


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A zero tensor whose memory becomes resident page by page as it is written: an anonymous private memory
    map on CPU (zero-filled by the kernel; the tensor keeps the map alive), ``torch.zeros`` elsewhere."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    memory = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(memory, dtype=dtype, count=math.prod(shape)).view(shape)


def lazy_kv_cache(config, batch_size: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
    """A ``KVCache`` of ``batch_size`` rows x ``max_len`` positions, all zeros, resident only where written."""
    cache = KVCache(config, batch_size, max_len=1, dtype=dtype, device=device)  # KVCache chooses the dtype
    shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
    cache.k = lazy_zeros(shape, cache.k.dtype, device)
    cache.v = lazy_zeros(shape, cache.v.dtype, device)
    cache.max_len = max_len
    return cache


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
