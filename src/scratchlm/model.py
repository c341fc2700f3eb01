"""The transformer: token ids in, next-token logits out.

One file, one class per idea, following a token from embedding to logits:

    ids -> token embedding (+ learned positions) -> n_layers x Block -> final norm -> LM head -> logits
    Block: x + Attention(norm(x)), then x + MLP(norm(x))            (pre-norm, GPT-2 and Llama alike)

A BERT encoder (``causal=False, norm_position="post"``) sees both directions, adds token-type embeddings,
normalises the embeddings, and puts each norm after its residual add: x = norm(x + Attention(x)); it has no
final norm, and ``scratchlm.encoder`` pools its hidden states instead of projecting them onto the vocabulary.

Shapes in comments: B batch, T new tokens, L cached + new tokens, H query heads, Hkv key/value heads,
D head size, C = d_model, V vocabulary.

Canonical parameter names (every file format converts to and from these, see ``formats/``):

    tok_embeddings.weight                 [V, C]
    pos_embeddings.weight                 [context_length, C]      (positions="learned" only)
    type_embeddings.weight                [type_vocab_size, C]     (type_vocab_size > 0 only)
    embed_norm.weight / .bias             [C]                      (norm_position="post" only)
    blocks.{i}.attn_norm.weight / .bias   [C]                      (.bias with layernorm only)
    blocks.{i}.attn.{q,k,v,o}_proj.weight [H*D or Hkv*D, C] / [C, H*D] for o   (+ .bias if config.bias)
    blocks.{i}.mlp_norm.weight / .bias    [C]
    blocks.{i}.mlp.{gate,up}_proj.weight  [d_ff, C]                (gate only with swiglu; + .bias if config.bias)
    blocks.{i}.mlp.down_proj.weight       [C, d_ff]
    final_norm.weight / .bias             [C]                      (norm_position="pre" only)
    lm_head.weight                        [V, C]                   (absent when tie_embeddings)

Q and K rows are in the "rotate half" layout of HF transformers (the GGUF loader undoes llama.cpp's
interleaved permutation).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from scratchlm.config import ModelConfig
from scratchlm.errors import ContextLengthError, ModelFileError


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * weight, no mean, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # PyTorch's fused kernel computes exactly this, in one call
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Statistics in float32: a bfloat16 sum of squares loses most of its digits. Then, as HF's Llama does,
        # round to the model's dtype before the weight.
        x32 = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


def rope_tables(config: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency) pair, each [context_length, D], in float32.

    RoPE (Su et al. 2021, eq. 34): pair i of a head rotates by angle pos * theta^(-2i/D). We use the
    "rotate half" pairing (i, i + D/2), as HF transformers does, so the frequencies are repeated twice.
    """
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    pos = torch.arange(config.context_length, device=device).float()
    angles = torch.outer(pos, inv_freq)  # [context, D/2]
    cos, sin = angles.cos(), angles.sin()
    # The sine table carries the rotation's signs: -sin for the first half, +sin for the second (see apply_rope).
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, D] by the angles of its positions; the tables are [B, 1, T, D].

    Each pair (x_i, x_{i+D/2}) turns by its angle a: (x_i cos a - x_{i+D/2} sin a, x_{i+D/2} cos a + x_i sin a).
    ``x.roll(D/2)`` swaps the halves and ``signed_sin`` holds (-sin, +sin), so this is three tensor operations.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class KVCache:
    """Preallocated keys and values for every layer, for a batch of sequences decoded together.

    ``k`` and ``v`` are [n_layers, B, Hkv, max_len, D]; ``lengths[b]`` counts the tokens cached for row b.
    Rows are independent: each one can hold a sequence of its own length (the server puts one request in
    each row), and a forward pass may touch only some rows (``rows=``).

    ``dtype`` is the model's dtype. On a CPU the cache is float32 whatever the model computes in: PyTorch's
    CPU attention is several times faster in float32 than in bfloat16 (one query against 256 cached keys:
    18 us against 111 us; against 2,048: 103 us against 876 us; 2-core AMD EPYC, torch 2.13), and keys and
    values are small next to the weights (SmolLM2: 46 KB per token in float32).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        self.max_len = max_len or config.context_length
        if torch.device(device or "cpu").type == "cpu":
            dtype = torch.float32
        shape = (config.n_layers, batch_size, config.n_kv_heads, self.max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def rows(self, start: int, stop: int) -> KVCache:
        """A KVCache of rows ``start:stop`` sharing this one's memory: a forward pass on it writes in place, where
        ``hidden_states(rows=...)`` on a strict subset gathers the rows into copies and writes them back."""
        view = KVCache.__new__(KVCache)
        view.max_len = self.max_len
        view.k, view.v, view.lengths = self.k[:, start:stop], self.v[:, start:stop], self.lengths[start:stop]
        return view

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Forget the cached tokens of some rows (all rows by default); the buffers stay allocated."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)] = 0


class AttentionMask(NamedTuple):
    """Which keys each query may see: an explicit boolean ``mask`` [B, 1, T or 1, kv_len], or ``causal``
    (SDPA's built-in lower-triangular mask, valid when queries and keys both start at position 0), or
    neither (every cached key is visible: one new token per row, all rows at the same position).

    ``stepwise`` (``hidden_states(stepwise_attention=True)``): for each row, the number of keys each of its real
    queries sees; every query then attends alone over exactly those keys, as a one-token step of that row would."""

    mask: torch.Tensor | None
    causal: bool
    kv_len: int
    stepwise: list[list[int]] | None = None


class Attention(nn.Module):
    """Self-attention, causal (or bidirectional in encoders), with grouped-query heads (Ainslie et al. 2023) and
    an optional KV cache."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, h, hkv, d = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(c, h * d, bias=config.bias)
        self.k_proj = nn.Linear(c, hkv * d, bias=config.bias)
        self.v_proj = nn.Linear(c, hkv * d, bias=config.bias)
        self.o_proj = nn.Linear(h * d, c, bias=config.bias)
        # Quantized models for inference replace q/k/v by one fused product (scratchlm.quant.fuse_projections).
        self.qkv_proj: nn.Module | None = None

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of x [B, T, C]: [B, T, H*D], [B, T, Hkv*D], [B, T, Hkv*D]."""
        if self.qkv_proj is not None:
            kv = self.config.n_kv_heads * self.config.head_dim
            return self.qkv_proj(x).split((self.config.n_heads * self.config.head_dim, kv, kv), dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: tuple[torch.Tensor, torch.Tensor] | None, positions: torch.Tensor,
                mask: AttentionMask, context: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of x [B, T, C] over itself, or with ``context`` [B, S, C] over that: cross-attention, the
        encoder-decoder link of Vaswani et al. 2017, section 3.2.3 (queries from x, keys and values from the
        encoder's output; ``scratchlm.seq2seq``)."""
        B, T, _ = x.shape
        cfg = self.config
        if context is None:
            q, k, v = self.project_qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(context), self.v_proj(context)
        S = k.shape[1]  # keys: T in self-attention
        q = q.view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, S, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = v.view(B, S, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        if cache is not None:
            # Write the new keys/values at each row's own positions, then attend over the whole prefix.
            k_cache, v_cache = cache  # (B, Hkv, max_len, D) each: views into KVCache for these rows
            if mask.mask is None and mask.stepwise is None:  # every row continues from the same position
                k_cache[:, :, mask.kv_len - T : mask.kv_len] = k
                v_cache[:, :, mask.kv_len - T : mask.kv_len] = v
            else:
                index = positions[:, None, :, None].expand(B, cfg.n_kv_heads, T, cfg.head_dim)
                k_cache.scatter_(2, index, k.to(k_cache.dtype))
                v_cache.scatter_(2, index, v.to(v_cache.dtype))
            k, v = k_cache[:, :, : mask.kv_len], v_cache[:, :, : mask.kv_len]
            q = q.to(k.dtype)  # the cache may be float32 under a bfloat16 model (see KVCache)
        dropout = cfg.dropout if self.training else 0.0
        if mask.stepwise is not None:
            y = self._stepwise(q, k, v, mask.stepwise).to(x.dtype)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask.mask, dropout_p=dropout, is_causal=mask.causal,
                enable_gqa=cfg.n_kv_heads != cfg.n_heads,
            ).to(x.dtype)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim))

    def _stepwise(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: list[list[int]]) -> torch.Tensor:
        """Each real query of each row alone, over exactly the ``counts[b][t]`` keys it sees and with no mask: the
        very call a one-token step of that row alone makes. One call over several queries, a mask or padded keys,
        or other rows beside it sums in another order (SDPA's CPU kernel: vectorised partial sums whose split
        depends on the key count, matrix products whose kernel depends on the query count, per-thread buffers
        whose alignment depends on the batch), and the int4 kernels round their inputs to bfloat16, which turns
        such last-bit differences into different tokens. Padding queries (beyond ``counts[b]``) are left at 0."""
        B, H, T, D = q.shape
        gqa = self.config.n_kv_heads != self.config.n_heads
        rows = []
        for b, row in enumerate(counts):  # torch.cat of the pieces: assigning slices costs twice the time here
            pieces = [F.scaled_dot_product_attention(q[b: b + 1, :, t: t + 1], k[b: b + 1, :, :n], v[b: b + 1, :, :n],
                                                     enable_gqa=gqa) for t, n in enumerate(row)]
            if len(row) < T:
                pieces.append(q.new_zeros(1, H, T - len(row), D))
            rows.append(torch.cat(pieces, dim=2))
        return torch.cat(rows)  # (B, H, T, D)


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (GPT-2) or SwiGLU (Shazeer 2020, used by Llama)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        self.gelu_approximate = config.gelu_approximate
        if self.swiglu:
            self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.gate_up_proj: nn.Module | None = None  # gate and up fused, as qkv_proj in Attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # GPT-2 uses the tanh approximation of GELU ("gelu_new"); BERT the exact erf form.
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.gelu_approximate))


class Block(nn.Module):
    """One transformer layer: attention then MLP, each added to the residual stream (norm before or after)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.post_norm = config.norm_position == "post"
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, cache, positions, mask):
        if self.post_norm:  # BERT (Devlin et al. 2018), as in the original transformer (Vaswani et al. 2017)
            x = self.attn_norm(x + self.dropout(self.attn(x, rope, cache, positions, mask)))
            return self.mlp_norm(x + self.dropout(self.mlp(x)))
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, cache, positions, mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    """A decoder-only language model (or, with ``causal=False``, a BERT-style encoder) described by a ModelConfig.

    ``model(input_ids)`` returns logits [B, T, V]. With a KVCache, only the new tokens are fed:
    prefill the prompt once, then one token per step.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.pos_embeddings = nn.Embedding(config.context_length, config.d_model)
        if config.type_vocab_size:
            self.type_embeddings = nn.Embedding(config.type_vocab_size, config.d_model)
        if config.norm_position == "post":
            self.embed_norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = make_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.gradient_checkpointing = False
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.apply(self._init_weights)
        # GPT-2 paper, section 2.3: scale the residual projections by 1/sqrt(number of residual layers).
        for name, p in self.named_parameters():
            # (not on the meta device: there nn.init runs a Python decomposition that imports torch._dynamo,
            # seconds of every load's start-up for weights that are replaced anyway)
            if name.endswith(("o_proj.weight", "down_proj.weight")) and p.device.type != "meta":
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.device.type != "meta":
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------------------------------------
    def rope(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables, built on first use (they are derived data, never saved)."""
        if self._rope is None or self._rope[0].device != torch.device(device):
            self._rope = rope_tables(self.config, device)
        return self._rope

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      rows: torch.Tensor | None = None, input_lengths: torch.Tensor | None = None,
                      token_types: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                      stepwise_attention: bool = False) -> torch.Tensor:
        """The final-norm hidden states [B, T, C] for ``input_ids`` [B, T].

        Without a cache this is a plain causal forward over positions 0..T-1. With a cache, the tokens
        continue each row's cached sequence: row b's tokens take positions lengths[b] .. lengths[b]+T-1
        and attend to everything cached before them. ``rows`` picks which cache rows the batch maps to
        (default: all, in order); ``input_lengths`` gives each row's real token count when the batch is
        right-padded (default: T for every row), and is what the cache lengths advance by.

        Encoders (``causal=False``) take no cache; ``padding_mask`` [B, T] (True on real tokens) hides the
        padding keys, and ``token_types`` [B, T] picks each token's segment embedding (default 0).

        ``stepwise_attention`` (with a cache): every real token attends alone over the keys it sees, so each row's
        states equal, bit for bit, those of feeding its tokens one at a time to that row alone (``Attention._stepwise``
        says why a batched call does not). Speculative verification uses it for greedy identity on the int4 engine:
        SmolLM2 int4 logits off by up to 0.19 without it, 0 with it. It costs one attention call per token per layer.
        """
        cfg = self.config
        B, T = input_ids.shape
        device = input_ids.device
        if cache is None:
            if T > cfg.context_length:
                raise ContextLengthError(
                    f"input of {T} tokens is longer than the context window of {cfg.context_length} tokens"
                )
            positions = torch.arange(T, device=device).expand(B, T)
            if cfg.causal:
                mask = AttentionMask(None, True, T)
            else:  # bidirectional: every query sees every real key of its row
                keys = None if padding_mask is None else padding_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
                mask = AttentionMask(keys, False, T)
            layer_cache = [None] * cfg.n_layers
        else:
            if not cfg.causal:
                raise ValueError("a KV cache needs causal attention; encoders take the whole input at once")
            if rows is None:
                rows = torch.arange(cache.batch_size, device=device)
            start = cache.lengths[rows]  # (B,)
            positions = start[:, None] + torch.arange(T, device=device)  # (B, T)
            L = int(start.max()) + T
            if L > cache.max_len:
                raise ContextLengthError(
                    f"{L} tokens do not fit in the context window of {cache.max_len} tokens"
                )
            # Query at position p sees keys 0..p of its own row; stale cache entries lie beyond p. SDPA's
            # fused kernels are several times faster without an explicit mask, so use one only when needed.
            first = int(start[0])
            if stepwise_attention:
                counts = input_lengths.tolist() if input_lengths is not None else [T] * B
                mask = AttentionMask(None, False, L, [[s + t + 1 for t in range(n)]
                                                      for s, n in zip(start.tolist(), counts)])
            elif bool((start == first).all()) and (T == 1 or first == 0):
                mask = AttentionMask(None, T > 1, L)
            else:
                visible = torch.arange(L, device=device)[None, None, :] <= positions[:, :, None]
                mask = AttentionMask(visible[:, None], False, L)  # (B, 1, T, L)
            if B == cache.batch_size and rows.tolist() == list(range(B)):
                layer_cache = [(cache.k[i], cache.v[i]) for i in range(cfg.n_layers)]  # views, no copy
            else:
                layer_cache = [(cache.k[i, rows], cache.v[i, rows]) for i in range(cfg.n_layers)]
        x = self.tok_embeddings(input_ids)  # (B, T, C)
        rope = None
        if cfg.positions == "learned":
            x = x + self.pos_embeddings(positions)
        else:
            cos, sin = self.rope(device)
            rope = (cos[positions][:, None].to(x.dtype), sin[positions][:, None].to(x.dtype))  # (B,1,T,D)
        if cfg.type_vocab_size:
            x = x + self.type_embeddings(token_types if token_types is not None else torch.zeros_like(input_ids))
        if cfg.norm_position == "post":
            x = self.embed_norm(x)
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, rope, layer_cache[i], positions, mask, use_reentrant=False)
            else:
                x = block(x, rope, layer_cache[i], positions, mask)
        if cache is not None:
            if layer_cache[0] is not None and layer_cache[0][0].data_ptr() != cache.k[0].data_ptr():
                # Rows were gathered into copies: write them back.
                for i, (k, v) in enumerate(layer_cache):
                    cache.k[i, rows] = k
                    cache.v[i, rows] = v
            advance = input_lengths if input_lengths is not None else T
            cache.lengths[rows] = start + advance
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states [..., C] onto the vocabulary: logits [..., V]."""
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, rows: torch.Tensor | None = None,
                input_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for input_ids [B, T]; see ``hidden_states`` for the cache arguments."""
        return self.logits(self.hidden_states(input_ids, cache, rows, input_lengths))

    # ----------------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied head counts once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def canonical_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under canonical names, without the tied LM head duplicate."""
        sd = self.state_dict()
        if self.config.tie_embeddings:
            sd.pop("lm_head.weight", None)
        return sd


def skeleton(config: ModelConfig) -> Transformer:
    """A Transformer on the meta device (shapes only, no memory), for loaders that assign the real tensors.

    The modules' weight initialisation is skipped while it is built: on meta tensors ``nn.init`` runs Python
    decompositions that import torch._dynamo, +74 MiB of RSS and seconds of every load's start-up (measured,
    torch 2.13), for values that are replaced anyway."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            return Transformer(config)
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical parameter name with its shape, for checking files before loading them."""
    model = skeleton(config)
    return {k: tuple(v.shape) for k, v in model.canonical_state_dict().items()}


def build_model(config: ModelConfig, state_dict: dict[str, torch.Tensor], source: str = "weights",
                dtype: torch.dtype | None = None) -> Transformer:
    """A Transformer holding ``state_dict`` (canonical names), checked name by name and shape by shape.

    The model is built on the meta device and the tensors are assigned, not copied, so loading needs no
    second copy of the weights. ``source`` names the file in error messages.
    """
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise ModelFileError(
            f"{source}: tensors do not match the architecture (missing {missing[:5]}, unexpected {extra[:5]})"
        )
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise ModelFileError(
                f"{source}: tensor {name} has shape {tuple(state_dict[name].shape)}, expected {shape}"
            )
    model = skeleton(config)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_embeddings.weight
    return model.eval()
