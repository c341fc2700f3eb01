"""Look inside one forward pass: the attention weights of every head and the residual stream after every layer.

The model's own forward pass stays as it is (fused SDPA, which never materialises the weights). Hooks record
what each attention layer receives (its normalised input and the RoPE tables) and what each block returns;
the weights are then recomputed from the layer's own projections by the textbook formula (Vaswani et al. 2017,
eq. 1), softmax(Q K^T / sqrt(D)) with the causal mask, which is what HF's ``attn_implementation="eager"``
computes and returns with ``output_attentions=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scratchlm.errors import ConfigError
from scratchlm.model import Attention, Transformer, apply_rope


@dataclass
class Trace:
    """What one forward pass over ``ids`` [T] went through.

    ``logits`` [T, V] (float32); ``residuals`` [n_layers + 1, T, C], in the model's dtype: the stream after the
    embeddings, then after each block (before the final norm); ``attention`` [n_layers, H, T, T]: row t of a
    head is how query t spreads its weight over keys 0..t (each row sums to 1), or None when not asked for.
    """

    ids: list[int]
    logits: torch.Tensor
    residuals: torch.Tensor
    attention: torch.Tensor | None


def head_weights(attn: Attention, x: torch.Tensor, rope, causal: bool = True) -> torch.Tensor:
    """Attention weights [B, H, T, T] of one layer for its (already normalised) input x [B, T, C], from the
    layer's own projections, in float32. Grouped-query heads share keys: query head h reads key head
    h // (H / Hkv), as SDPA's ``enable_gqa`` and HF's ``repeat_kv`` do."""
    cfg = attn.config
    B, T, _ = x.shape
    q, k, _ = attn.project_qkv(x)
    q = q.view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
    k = k.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k = k.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)  # (B, H, T, D)
    # Scores in float32: a bfloat16 softmax over a long row loses the small weights a learner wants to see.
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(cfg.head_dim)  # (B, H, T, T)
    if causal:
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1)


def trace(model: Transformer, ids: list[int], attention: bool = True) -> Trace:
    """Run ``model`` once over ``ids`` (no KV cache) and record the residual stream and, if asked, every
    layer's attention weights."""
    if not ids:
        raise ConfigError("there is nothing to explain: the text encodes to no tokens")
    cfg = model.config
    if len(ids) > cfg.context_length:
        raise ConfigError(f"the text is {len(ids)} tokens long; the model's context window is "
                          f"{cfg.context_length}: shorten it")
    device = next(model.parameters()).device
    residuals: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []

    def before_first_block(module, args):
        residuals.append(args[0][0])

    def after_block(module, args, output):
        residuals.append(output[0])

    def before_attention(module, args):
        x, rope = args[0], args[1]
        weights.append(head_weights(module, x, rope, cfg.causal)[0])

    handles = [model.blocks[0].register_forward_pre_hook(before_first_block)]
    for block in model.blocks:
        handles.append(block.register_forward_hook(after_block))
        if attention:
            handles.append(block.attn.register_forward_pre_hook(before_attention))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=device))[0].float()
    finally:
        for handle in handles:
            handle.remove()
    return Trace(list(ids), logits, torch.stack(residuals), torch.stack(weights) if attention else None)


def attention_weights(llm, text: str | list[int]) -> torch.Tensor:
    """The attention weights [n_layers, n_heads, T, T] of ``llm`` (an ``LLM``) over ``text`` (a string, encoded
    with the model's tokenizer, special tokens allowed, or a list of token ids), in float32 on the CPU."""
    ids = text if isinstance(text, list) else llm.tokenizer.encode(text, allowed_special="all")
    return trace(llm.model, ids).attention.cpu()
