"""Read HF transformers model directories (Llama and GPT-2) into the canonical representation.

A directory holds ``config.json``, ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), ``tokenizer.json`` and usually ``tokenizer_config.json``. Older models
ship ``pytorch_model.bin`` (or its shards) instead: those are read with PyTorch's weights-only unpickler
(``formats.torch_files``), and a file that needs more than tensors is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import ModelFileError, UnsupportedError
from scratchlm.files import read_json

ARCHITECTURES = ("LlamaForCausalLM", "GPT2LMHeadModel")


# transformers' activation names for GPT-2 -> the ``approximate`` argument of torch's gelu: GPT-2 itself uses the
# tanh form ("gelu_new"); nanoGPT-style models exported with exact GELU say "gelu".
GPT2_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def config_from_hf(hf: dict[str, Any], name: str = "hf") -> ModelConfig:
    """The ModelConfig for an HF ``config.json`` dict."""
    arch = (hf.get("architectures") or [hf.get("model_type")])[0]
    if arch == "LlamaForCausalLM" or hf.get("model_type") == "llama":
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedError(f"Llama with activation {hf['hidden_act']!r} is not supported (only silu)")
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise UnsupportedError(f"RoPE scaling {rope_type!r} is not supported")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or None  # a structured-pruned model's heads need not tile hidden_size
        if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
            raise UnsupportedError("Llama with attention_bias != mlp_bias is not supported")
        return ModelConfig(
            name=name, vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"],
            d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads, d_ff=hf["intermediate_size"], head_dim=head_dim,
            positions="rope", norm="rmsnorm", mlp="swiglu", bias=bool(hf.get("attention_bias", False)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta") or hf.get("rope_theta") or 10000.0),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    if arch == "GPT2LMHeadModel" or hf.get("model_type") == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in GPT2_GELU:
            raise UnsupportedError(f"GPT-2 with activation {act!r} is not supported (only {', '.join(GPT2_GELU)})")
        return ModelConfig(
            name=name, vocab_size=hf["vocab_size"], context_length=hf["n_positions"], d_model=hf["n_embd"],
            n_layers=hf["n_layer"], n_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
            positions="learned", norm="layernorm", mlp="gelu", bias=True, gelu_approximate=GPT2_GELU[act],
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )
    if hf.get("model_type") == "bert":  # an encoder: scratchlm.encoder reads it (formats/bert.py)
        raise UnsupportedError(f"{arch} is an encoder, not a language model: use `scratchlm embed` or Encoder.load")
    raise UnsupportedError(f"unsupported architecture {arch!r}; scratchlm reads {', '.join(ARCHITECTURES)}")


def _llama_names(n_layers: int) -> dict[str, str]:
    """HF Llama parameter name -> canonical name."""
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "final_norm.weight",
             "lm_head.weight": "lm_head.weight"}
    for i in range(n_layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        names[hf + "input_layernorm.weight"] = ours + "attn_norm.weight"
        names[hf + "post_attention_layernorm.weight"] = ours + "mlp_norm.weight"
        for p in ("q", "k", "v", "o"):
            for kind in ("weight", "bias"):
                names[f"{hf}self_attn.{p}_proj.{kind}"] = f"{ours}attn.{p}_proj.{kind}"
        for p in ("gate", "up", "down"):
            for kind in ("weight", "bias"):
                names[f"{hf}mlp.{p}_proj.{kind}"] = f"{ours}mlp.{p}_proj.{kind}"
    return names


def _gpt2_names(n_layers: int) -> dict[str, str]:
    """HF GPT-2 parameter name -> canonical name (``c_attn`` is split into q/k/v separately)."""
    names = {"transformer.wte.weight": "tok_embeddings.weight", "transformer.wpe.weight": "pos_embeddings.weight",
             "lm_head.weight": "lm_head.weight"}
    for kind in ("weight", "bias"):
        names[f"transformer.ln_f.{kind}"] = f"final_norm.{kind}"
        for i in range(n_layers):
            hf, ours = f"transformer.h.{i}.", f"blocks.{i}."
            names[f"{hf}ln_1.{kind}"] = f"{ours}attn_norm.{kind}"
            names[f"{hf}ln_2.{kind}"] = f"{ours}mlp_norm.{kind}"
            names[f"{hf}attn.c_attn.{kind}"] = f"{ours}attn.qkv.{kind}"
            names[f"{hf}attn.c_proj.{kind}"] = f"{ours}attn.o_proj.{kind}"
            names[f"{hf}mlp.c_fc.{kind}"] = f"{ours}mlp.up_proj.{kind}"
            names[f"{hf}mlp.c_proj.{kind}"] = f"{ours}mlp.down_proj.{kind}"
    return names


def hf_name_map(config: ModelConfig) -> dict[str, str]:
    """HF parameter name -> canonical name for this architecture."""
    return _gpt2_names(config.n_layers) if config.positions == "learned" else _llama_names(config.n_layers)


def from_hf_state_dict(config: ModelConfig, hf_state: dict[str, torch.Tensor],
                       source: str = "", conv1d: bool = True) -> dict[str, torch.Tensor]:
    """Rename HF tensors to canonical names (GPT-2: transpose Conv1D weights and split c_attn).

    ``conv1d=False`` reads GPT-2 names whose weights are already ``nn.Linear``'s ``[out, in]`` (nanoGPT).
    """
    names = hf_name_map(config)
    gpt2 = config.positions == "learned"
    state: dict[str, torch.Tensor] = {}
    for hf_name, tensor in hf_state.items():
        key = hf_name[len("model."):] if gpt2 and hf_name.startswith("model.") else hf_name
        if gpt2 and not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key  # GPT2Model checkpoints omit the "transformer." prefix
        if gpt2 and key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old GPT-2 files store the causal mask as a buffer
        if key not in names:
            raise ModelFileError(f"{source}: unexpected tensor {hf_name} for this architecture")
        ours = names[key]
        is_conv1d = "embeddings" not in ours and ours != "lm_head.weight"
        if gpt2 and conv1d and is_conv1d and ours.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.t()  # GPT-2's Conv1D stores weights as [in, out]
        if ".attn.qkv." in ours:
            for part, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                state[ours.replace(".qkv.", f".{part}_proj.")] = chunk.contiguous()
        else:
            state[ours] = tensor.contiguous()
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards in ``model.safetensors.index.json``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [directory / f for f in sorted(set(read_json(index)["weight_map"].values()))]
    else:
        raise ModelFileError(f"{directory} has no model.safetensors, model.safetensors.index.json "
                             "or pytorch_model.bin")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise ModelFileError(f"missing weights shard: {f}")
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFileError(f"{f} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    return tensors


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The HF tensors of a directory: safetensors when present, else ``pytorch_model.bin`` read safely."""
    from scratchlm.formats import torch_files

    has_safetensors = (directory / "model.safetensors").is_file() or \
        (directory / "model.safetensors.index.json").is_file()
    if not has_safetensors and torch_files.has_hf_weights(directory):
        return torch_files.read_hf_bin(directory)
    return read_safetensors(directory)


def load_hf(directory: str | Path,
            dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """Read an HF model directory: (config, canonical state dict in ``dtype``, tokenizer_config dict)."""
    directory = Path(directory)
    config = config_from_hf(read_json(directory / "config.json"), name=directory.name)
    state = from_hf_state_dict(config, read_weights(directory), source=str(directory))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    tok_config_path = directory / "tokenizer_config.json"
    tok_config = read_json(tok_config_path) if tok_config_path.is_file() else {}
    return config, state, tok_config
