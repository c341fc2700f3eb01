"""What every exporter shares: which outside architecture a model maps to and the GPT-2 tensor layout.

All-or-nothing writes (``atomic_file``, ``atomic_dir``) live in ``scratchlm.files``.
"""

from __future__ import annotations

import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import UnsupportedError

LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu")
GPT2 = dict(positions="learned", norm="layernorm", mlp="gelu")


def export_architecture(config: ModelConfig) -> str:
    """``"llama"`` or ``"gpt2"``: the outside architecture with this model's layout, or UnsupportedError.

    HF transformers and llama.cpp name fixed combinations of our switches; any other mix has no class
    there that would compute the same function.
    """
    switches = dict(positions=config.positions, norm=config.norm, mlp=config.mlp)
    if switches == LLAMA:
        return "llama"
    if switches == GPT2:
        if config.n_kv_heads != config.n_heads:
            raise UnsupportedError(
                f"GPT-2 has no grouped-query attention, but this model has {config.n_kv_heads} key/value heads "
                f"for {config.n_heads} query heads; only Llama-style models (rope, rmsnorm, swiglu) can have them"
            )
        return "gpt2"
    mix = ", ".join(f"{k}={v}" for k, v in switches.items())
    raise UnsupportedError(
        f"this model mixes {mix}; HF transformers and llama.cpp only have the Llama layout "
        "(rope, rmsnorm, swiglu) and the GPT-2 layout (learned, layernorm, gelu), so it cannot be exported"
    )


def check_dense(llm) -> None:
    """Refuse a model held in quantized layers: exports write the dense weights, which it no longer has in memory
    (a quantized GGUF loads as int4/int8 layers by default)."""
    from scratchlm.quant.quantize import quantization_of

    info = quantization_of(llm.model)
    if info is not None:
        raise UnsupportedError(
            f"this model is loaded in {info['mode']} layers; exports need the dense weights: load it with "
            "LLM.load(source, dtype='float32') (as `scratchlm convert` does), or export to GGUF from the dense model")


def fuse_gpt2_qkv(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2 layout of a canonical state dict: q/k/v fused into ``blocks.{i}.attn.qkv`` ([3C, C]; HF and
    llama.cpp both store one fused tensor), and missing linear biases (a GPT-2-style model trained with
    ``bias=False``) added as zeros, which computes the same function: both formats require the biases."""


    state = dict(state)
    for i in range(config.n_layers):
        attn = f"blocks.{i}.attn."
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{attn}{p}_proj.{kind}", None) for p in "qkv"]
            if parts[0] is not None:
                state[f"{attn}qkv.{kind}"] = torch.cat(parts, dim=0)
        for name in (f"{attn}qkv", f"{attn}o_proj", f"blocks.{i}.mlp.up_proj", f"blocks.{i}.mlp.down_proj"):
            weight = state[f"{name}.weight"]
            state.setdefault(f"{name}.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
    return state
