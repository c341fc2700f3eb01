"""Checkpoints pickled by PyTorch, read safely: HF ``pytorch_model.bin``, nanoGPT ``ckpt.pt``, litgpt ``lit_model.pth``.

``torch.save`` writes a zip of tensor storages plus a pickle that says how to put them together. A pickle
can name any Python callable, so ``torch.load`` of an untrusted file can run code. We only ever call
``torch.load(..., weights_only=True)``: PyTorch's restricted unpickler, which accepts tensors, dicts,
lists and plain numbers and refuses every other global. A file that needs more (a pickled class, a
lambda, a ``__reduce__`` payload) is refused with one line, never "trusted". ``mmap=True`` maps the
storages instead of reading them, so an optimizer state stored beside the weights costs nothing.

Three layouts, each converted to the canonical names at the edge:

* **HF transformers** ``pytorch_model.bin`` (or shards listed in ``pytorch_model.bin.index.json``): the
  same tensors as ``model.safetensors`` (see ``formats.hf``).
* **nanoGPT** ``ckpt.pt`` (karpathy/nanoGPT, ``train.py``): a dict with ``model_args`` (n_layer, n_head,
  n_embd, block_size, bias, vocab_size, dropout), ``model`` (GPT-2 names with ``nn.Linear`` weights, i.e.
  ``[out, in]`` unlike HF's Conv1D, prefixed ``_orig_mod.`` when the model was compiled), ``optimizer``,
  ``iter_num``, ``best_val_loss``, ``config``. nanoGPT keeps no tokenizer beside it (GPT-2's BPE through
  tiktoken, or a pickled char table ``meta.pkl`` which we do not unpickle), so the tokenizer comes from a
  ``tokenizer.json`` beside the file or from the caller.
* **litgpt** ``lit_model.pth`` (a state dict, or ``{"model": state dict}`` after fine-tuning) with
  ``model_config.yaml`` (``litgpt.Config``) and usually the HF tokenizer files beside it.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import ModelFileError, UnsupportedError
from scratchlm.files import read_json

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
HF_WEIGHTS = "pytorch_model.bin"
HF_INDEX = "pytorch_model.bin.index.json"
LITGPT_WEIGHTS = "lit_model.pth"
LITGPT_CONFIG = "model_config.yaml"
NANOGPT_FILE = "ckpt.pt"


def load_safely(path: str | Path) -> Any:
    """``torch.load`` with the weights-only unpickler (memory-mapped when the file allows); one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"missing weights file: {path}")
    # Files from torch < 1.6 are not zip archives and cannot be memory-mapped; they still load weights-only.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # torch's message is a page long; keep the global it refused, which names what the file wanted to run.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:  # not a pickle torch.save wrote: garbage or another format under a .bin/.pt name
            raise ModelFileError(f"{path} is not a readable PyTorch checkpoint (not written by torch.save, "
                                 "truncated or corrupt?)") from None
        raise ModelFileError(
            f"{path} is refused: it needs PyTorch's unsafe unpickler, which can run code (the file calls for "
            f"{found.group(1)}); scratchlm loads only tensors (weights_only=True): re-save the state dict or "
            "safetensors from code you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFileError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {first}") from None


def _state_dict(obj: Any, path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint (``obj[key]`` when given and present)."""
    if key is not None and isinstance(obj, dict) and isinstance(obj.get(key), dict):
        obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{path} does not hold a state dict (a dict of tensors)")
    return obj


# ---- HF pytorch_model.bin ----------------------------------------------------------------------------------------
def has_hf_weights(directory: Path) -> bool:
    return (directory / HF_WEIGHTS).is_file() or (directory / HF_INDEX).is_file()


def read_hf_bin(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``pytorch_model.bin`` or of the shards listed in ``pytorch_model.bin.index.json``."""
    if (directory / HF_WEIGHTS).is_file():
        files = [directory / HF_WEIGHTS]
    else:
        files = [directory / f for f in sorted(set(read_json(directory / HF_INDEX)["weight_map"].values()))]
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update({k: v.clone() for k, v in _state_dict(load_safely(f), f).items()})  # out of the map
    return tensors


# ---- nanoGPT ckpt.pt -----------------------------------------------------------------------------------------------
def is_nanogpt(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("model_args"), dict) and isinstance(obj.get("model"), dict)


def nanogpt_config(model_args: dict[str, Any], name: str = "nanogpt") -> ModelConfig:
    """The ModelConfig of nanoGPT's ``GPTConfig`` (model.py): GPT-2's architecture with optional biases."""
    try:
        return ModelConfig(
            name=name, vocab_size=int(model_args["vocab_size"]), context_length=int(model_args["block_size"]),
            d_model=int(model_args["n_embd"]), n_layers=int(model_args["n_layer"]), n_heads=int(model_args["n_head"]),
            positions="learned", norm="layernorm", mlp="gelu", bias=bool(model_args.get("bias", True)),
            gelu_approximate="none",  # nanoGPT's MLP uses nn.GELU(), the exact erf form (GPT-2's own is tanh)
            norm_eps=1e-5, tie_embeddings=True,  # nanoGPT: LayerNorm(eps=1e-5); wte and lm_head share one matrix
        )
    except KeyError as exc:
        raise ModelFileError(f"nanoGPT model_args lacks {exc.args[0]!r}") from None


def nanogpt_state(config: ModelConfig, model: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """nanoGPT tensors -> canonical tensors (LayerNorms without bias get a zero bias, which is the same norm)."""
    from scratchlm.formats.hf import from_hf_state_dict

    # torch.compile wraps the module, so a compiled run saves every name under "_orig_mod." (nanoGPT's
    # sample.py strips it the same way).
    model = {k.removeprefix("_orig_mod."): v for k, v in model.items()}
    state = from_hf_state_dict(config, model, source=source, conv1d=False)
    for name, tensor in list(state.items()):
        if name.endswith("norm.weight") and name.replace(".weight", ".bias") not in state:
            state[name.replace(".weight", ".bias")] = torch.zeros_like(tensor)
    return state


# ---- litgpt lit_model.pth + model_config.yaml ------------------------------------------------------------------
def is_litgpt_dir(directory: Path) -> bool:
    return (directory / LITGPT_WEIGHTS).is_file() and (directory / LITGPT_CONFIG).is_file()


def read_litgpt_config(directory: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load((directory / LITGPT_CONFIG).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{directory / LITGPT_CONFIG} is not readable YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{directory / LITGPT_CONFIG} does not hold a litgpt Config mapping")
    return data


# litgpt.Config fields and the value our architecture needs (anything else is a different model).
_LITGPT_REQUIRED = {
    "mlp_class_name": "LLaMAMLP", "norm_class_name": "RMSNorm", "parallel_residual": False,
    "shared_attention_norm": False, "rotary_percentage": 1.0, "rope_condense_ratio": 1, "rope_adjustments": None,
    "rope_interleave": False, "norm_qk": False, "post_attention_norm": False, "post_mlp_norm": False,
    "scale_embeddings": False, "lm_head_bias": False, "n_expert": 0, "latent_attention": None,
    "sliding_window_size": None, "attention_logit_softcapping": None, "final_logit_softcapping": None,
    "attention_scores_scalar": None, "rope_local_base_freq": None, "norm_1": True, "norm_2": True,
}


def litgpt_config(cfg: dict[str, Any], name: str = "litgpt") -> ModelConfig:
    """The ModelConfig of a litgpt ``Config`` dict; architectures outside the Llama subset are refused."""
    for field, wanted in _LITGPT_REQUIRED.items():
        if field in cfg and cfg[field] != wanted:
            raise UnsupportedError(f"litgpt model with {field}={cfg[field]!r} is not supported "
                                   f"(scratchlm runs the Llama subset: {field}={wanted!r})")
    if "Gemma" in str(cfg.get("name", "")):
        raise UnsupportedError("litgpt Gemma models (RMSNorm with a unit offset) are not supported")
    try:
        n_embd, n_head = int(cfg["n_embd"]), int(cfg["n_head"])
        if cfg.get("head_size") not in (None, n_embd // n_head):
            raise UnsupportedError("litgpt model with head_size != n_embd / n_head is not supported")
        bias, attn_bias = bool(cfg.get("bias", True)), bool(cfg.get("attn_bias", False))
        if bias != (bias or attn_bias):
            raise UnsupportedError("litgpt model with attn_bias but no bias is not supported")
        vocab = cfg.get("padded_vocab_size") or cfg["vocab_size"]
        return ModelConfig(
            name=name, vocab_size=int(vocab), context_length=int(cfg["block_size"]), d_model=n_embd,
            n_layers=int(cfg["n_layer"]), n_heads=n_head, n_kv_heads=int(cfg.get("n_query_groups") or n_head),
            d_ff=int(cfg["intermediate_size"]), positions="rope", norm="rmsnorm", mlp="swiglu", bias=bias,
            norm_eps=float(cfg.get("norm_eps", 1e-5)), rope_theta=float(cfg.get("rope_base", 10000)),
            tie_embeddings=False,  # litgpt always stores lm_head; tied below when the two are equal
        )
    except KeyError as exc:
        raise ModelFileError(f"{LITGPT_CONFIG} lacks {exc.args[0]!r}") from None


def _split_litgpt_qkv(config: ModelConfig, fused: torch.Tensor, legacy: bool) -> list[torch.Tensor]:
    """q, k, v of litgpt's fused projection (rows, or bias entries).

    Current litgpt (``attn.qkv``) stacks all query heads, then all key heads, then all value heads. Older
    files (``attn.attn``) interleave them per query group: [q x (n_heads/n_kv_heads), k, v] for each group,
    which is what litgpt's own ``qkv_reassemble`` undoes when it loads them.
    """
    d, h, hkv = config.head_dim, config.n_heads, config.n_kv_heads
    if not legacy:
        return list(fused.split([h * d, hkv * d, hkv * d], dim=0))
    groups = [g.split([h // hkv * d, d, d], dim=0) for g in fused.chunk(hkv, dim=0)]
    return [torch.cat([g[i] for g in groups]) for i in range(3)]


def litgpt_state(config: ModelConfig, lit: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """litgpt tensor names (``litgpt/model.py``) -> canonical names."""
    top = {"transformer.wte.weight": "tok_embeddings.weight", "transformer.ln_f.weight": "final_norm.weight",
           "lm_head.weight": "lm_head.weight"}
    per_layer = {"norm_1.weight": "attn_norm.weight", "norm_2.weight": "mlp_norm.weight",
                 "attn.proj.weight": "attn.o_proj.weight", "attn.proj.bias": "attn.o_proj.bias",
                 "mlp.fc_1.weight": "mlp.gate_proj.weight", "mlp.fc_1.bias": "mlp.gate_proj.bias",
                 "mlp.fc_2.weight": "mlp.up_proj.weight", "mlp.fc_2.bias": "mlp.up_proj.bias",
                 "mlp.proj.weight": "mlp.down_proj.weight", "mlp.proj.bias": "mlp.down_proj.bias"}
    layer = re.compile(r"transformer\.h\.(\d+)\.(.+)")
    state: dict[str, torch.Tensor] = {}
    for name, tensor in lit.items():
        name = name.removeprefix("_orig_mod.")
        match = layer.fullmatch(name)
        if name in top:
            state[top[name]] = tensor
        elif match and match.group(2) in per_layer:
            state[f"blocks.{match.group(1)}.{per_layer[match.group(2)]}"] = tensor
        elif match and match.group(2).split(".")[:2] in (["attn", "qkv"], ["attn", "attn"]):
            kind = match.group(2).rsplit(".", 1)[1]
            parts = _split_litgpt_qkv(config, tensor, legacy=match.group(2).startswith("attn.attn"))
            for part, chunk in zip("qkv", parts):
                state[f"blocks.{match.group(1)}.attn.{part}_proj.{kind}"] = chunk.contiguous()
        elif name.endswith((".rope_cache", ".mask_cache", ".cos", ".sin")):
            continue  # buffers of old litgpt versions, rebuilt from the config
        else:
            raise ModelFileError(f"{source}: unexpected tensor {name} for a litgpt Llama-style model")
    return state


def load_litgpt_dir(directory: Path,
                    dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a litgpt checkpoint directory: (config, canonical state dict in ``dtype``)."""
    config = litgpt_config(read_litgpt_config(directory), name=directory.name)
    weights = directory / LITGPT_WEIGHTS
    state = litgpt_state(config, _state_dict(load_safely(weights), weights, key="model"), str(weights))
    if "lm_head.weight" in state and torch.equal(state["lm_head.weight"], state.get("tok_embeddings.weight")):
        config = config.replace(tie_embeddings=True)  # a tied model converted to litgpt stores the matrix twice
        state.pop("lm_head.weight")
    return config, _cast(state, dtype)


def load_nanogpt(path: Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a nanoGPT ``ckpt.pt``: (config, canonical state dict in ``dtype``)."""
    obj = load_safely(path)
    if not is_nanogpt(obj):
        raise ModelFileError(f"{path} is not a nanoGPT checkpoint (no 'model_args' and 'model' entries); "
                             "scratchlm reads nanoGPT ckpt.pt, litgpt lit_model.pth and HF pytorch_model.bin")
    config = nanogpt_config(obj["model_args"], name=path.parent.name or path.stem)
    model = {k.removeprefix("_orig_mod."): v for k, v in _state_dict(obj["model"], path).items()}
    head, embedding = model.get("lm_head.weight"), model.get("transformer.wte.weight")
    if head is not None and embedding is not None and not torch.equal(head, embedding):
        config = config.replace(tie_embeddings=False)  # a nanoGPT variant that unties the head: keep both
    return config, _cast(nanogpt_state(config, model, str(path)), dtype)


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors in ``dtype``, copied out of the memory map: a model must not share pages with a file that its
    writer may rewrite in place (nanoGPT's train.py saves over ckpt.pt), which would crash it (SIGBUS)."""
    return {k: v.to(dtype, copy=True) if v.is_floating_point() else v.clone() for k, v in state.items()}


def stored_dtypes(path: Path) -> list[str]:
    """The dtype of every tensor a checkpoint stores for the model (memory-mapped: weights are not read)."""
    obj = load_safely(path)
    if is_nanogpt(obj):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    return [str(v.dtype).removeprefix("torch.") for v in _state_dict(obj, path).values()]
