"""Prefix caching: the keys and values of prompts the server has seen, kept in blocks and reused by later requests.

A prompt's tokens are cut into blocks of ``block_size`` tokens. Each full block is a node of a tree whose path
from the root spells the tokens before it, so a node stands for exactly one prefix: two requests that share a
system prompt (or a conversation so far) walk the same nodes and the second one copies their keys and values
instead of computing them again. This is vLLM's automatic prefix caching (hashes of block chains) and SGLang's
RadixAttention (a radix tree over tokens) at block granularity. A child is found by its block's token tuple, not
by a hash of it, so two different prefixes can never be taken for one another.

Keys and values depend on everything before them *and* on the weights, so each LoRA adapter has its own root.

Memory is bounded by a budget: when a new block does not fit, the least recently used block that no other block
extends (a leaf) is dropped, so a cached chain never loses its middle. Blocks live outside the engine's per-slot
``KVCache``; ``store`` copies finished positions out of a slot, ``load`` copies a matched prefix into one.
``reuse_prefix`` is the engine's side: it fills a joining request's row from this cache or from a running request.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from scratchlm.errors import ConfigError

DEFAULT_BLOCK_SIZE = 16  # tokens per block, as vLLM's default
DEFAULT_BUDGET_MB = 256.0  # SmolLM2 in float32: 46 KB per token, about 5,700 cached tokens


class Block:
    """``block_size`` tokens' keys and values for every layer: ``kv`` [2, n_layers, Hkv, block_size, D]."""

    __slots__ = ("tokens", "parent", "children", "kv")

    def __init__(self, tokens: tuple[int, ...], parent: Block | None, kv: torch.Tensor | None):
        self.tokens, self.parent, self.kv = tokens, parent, kv
        self.children: dict[tuple[int, ...], Block] = {}


class PrefixCache:
    """Keys and values of token blocks, looked up by the longest cached prefix, LRU-evicted under a byte budget."""

    def __init__(self, config, budget_mb: float = DEFAULT_BUDGET_MB, block_size: int = DEFAULT_BLOCK_SIZE,
                 dtype: torch.dtype = torch.float32, device=None):
        if block_size < 1:
            raise ConfigError(f"prefix cache block size must be at least 1 token, got {block_size}")
        self.block_size, self.dtype, self.device = block_size, dtype, device
        self.shape = (2, config.n_layers, config.n_kv_heads, block_size, config.head_dim)
        self.block_bytes = 2 * config.n_layers * config.n_kv_heads * block_size * config.head_dim * \
            torch.empty(0, dtype=dtype).element_size()
        self.capacity = int(budget_mb * 2**20) // self.block_bytes
        if self.capacity < 1:
            need = self.block_bytes / 2**20
            raise ConfigError(f"--prefix-cache-mb {budget_mb:g} holds no block of {block_size} tokens (one block of "
                              f"this model takes {need:.3g} MB): give at least {need:.3g}, or 0 to turn the prefix "
                              "cache off")
        self.roots: dict[object, Block] = {}
        self.lru: OrderedDict[int, Block] = OrderedDict()  # id(block) -> block, least recently used first
        self.hits = 0  # tokens served from the cache

    def __len__(self) -> int:
        return len(self.lru)

    @property
    def bytes_used(self) -> int:
        return len(self.lru) * self.block_bytes

    def _blocks(self, tokens: list[int]):
        bs = self.block_size
        for start in range(0, len(tokens) - bs + 1, bs):
            yield tuple(tokens[start: start + bs])

    def match(self, tokens: list[int], namespace: object = 0) -> list[Block]:
        """The cached blocks that spell the longest prefix of ``tokens`` (full blocks only), marked as used."""
        node, chain = self.roots.get(namespace), []
        if node is None:
            return chain
        for key in self._blocks(tokens):
            node = node.children.get(key)
            if node is None:
                break
            chain.append(node)
        for block in reversed(chain):  # deepest first: the root end stays the most recently used
            self.lru.move_to_end(id(block))
        return chain

    def load(self, chain: list[Block], k: torch.Tensor, v: torch.Tensor, n_tokens: int) -> None:
        """Copy the first ``n_tokens`` positions of ``chain`` into one slot's keys and values, each
        [n_layers, Hkv, max_len, D] (a view of the engine's cache row)."""
        bs = self.block_size
        for i, block in enumerate(chain):
            n = min(bs, n_tokens - i * bs)
            if n <= 0:
                break
            k[:, :, i * bs: i * bs + n] = block.kv[0, :, :, :n]
            v[:, :, i * bs: i * bs + n] = block.kv[1, :, :, :n]
        self.hits += n_tokens

    def store(self, tokens: list[int], k: torch.Tensor, v: torch.Tensor, namespace: object = 0) -> int:
        """Keep the full blocks of ``tokens``, whose keys and values are positions 0..len-1 of ``k`` and ``v``
        ([n_layers, Hkv, max_len, D], one slot's row). Blocks already cached are only marked as used. Returns the
        number of new blocks."""
        node = self.roots.setdefault(namespace, Block((), None, None))
        bs, added, chain = self.block_size, 0, []
        for i, key in enumerate(self._blocks(tokens)):
            child = node.children.get(key)
            if child is None:
                if len(self.lru) >= self.capacity and not self._evict(keep=node):
                    break
                kv = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                kv[0].copy_(k[:, :, i * bs: (i + 1) * bs])
                kv[1].copy_(v[:, :, i * bs: (i + 1) * bs])
                child = node.children[key] = Block(key, node, kv)
                self.lru[id(child)] = child
                added += 1
            chain.append(child)
            node = child
        for block in reversed(chain):
            self.lru.move_to_end(id(block))
        return added

    def _evict(self, keep: Block) -> bool:
        """Drop the least recently used leaf other than ``keep`` (the block being extended)."""
        for key, block in self.lru.items():
            if not block.children and block is not keep:
                del self.lru[key]
                del block.parent.children[block.tokens]
                block.kv = None
                return True
        return False

    def clear(self) -> None:
        self.roots.clear()
        self.lru.clear()


def shared_prefix(a: list[int], b: list[int], limit: int | None = None) -> int:
    """How many leading tokens ``a`` and ``b`` have in common (at most ``limit``)."""
    n, end = 0, min(len(a), len(b), len(a) if limit is None else limit)
    while n < end and a[n] == b[n]:
        n += 1
    return n


def reuse_prefix(active, running, cache, prefix_cache: PrefixCache | None) -> int:
    """Copy into ``active``'s cache row the keys and values of the longest prefix of its prompt already computed
    (a shared system prompt, the same conversation so far) instead of computing them again: from the prefix cache
    (whole blocks of earlier and running requests), or token by token from a ``running`` request's row when that
    one shares more. At least the last prompt token is always left to compute: its logits give the first new
    token. Returns the number of tokens copied (the caller sets the row's length).

    ``active`` and ``running`` are the engine's requests (``slot``, ``job.prompt_ids``, ``job.adapter`` and
    ``cached_prompt``: the prompt tokens whose keys and values sit at their own positions in the row, none once a
    context shift has moved them). Positions below a request's ``done`` never change otherwise, so a running
    request's row is safe to copy."""
    prompt, best, donor, adapter = active.job.prompt_ids, 0, None, active.job.adapter
    for other in running:  # keys and values depend on the adapter too: only a row of the same one
        if other is not None and other is not active and other.job.adapter == adapter:
            n = shared_prefix(prompt, other.cached_prompt, limit=len(prompt) - 1)
            if n > best:
                best, donor = n, other
    chain = prefix_cache.match(prompt, adapter) if prefix_cache is not None else []
    from_cache = min(len(chain) * prefix_cache.block_size, len(prompt) - 1) if chain else 0
    slot = active.slot
    if from_cache > best:
        best = from_cache
        prefix_cache.load(chain, cache.k[:, slot], cache.v[:, slot], best)
    elif donor is not None:
        for kv in (cache.k, cache.v):
            kv[:, slot, :, :best] = kv[:, donor.slot, :, :best]
    return best
