"""LoRA adapters in HF PEFT's on-disk format, so that the rest of the ecosystem can use them.

    adapter/
        adapter_config.json         PEFT's LoraConfig: peft_type LORA, r, lora_alpha, target_modules, ...
        adapter_model.safetensors   base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  [r, in]
                                    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  [out, r]

The tensor names are PEFT's for HF ``LlamaForCausalLM`` (``base_model.model.`` + the HF module name), so
``PeftModel.from_pretrained(hf_model, "adapter")`` loads what we write and we load what PEFT writes.
Our canonical Q and K rows are already in HF's layout (model.py), so no tensor needs reordering.

PEFT ignores the safetensors header metadata; we keep there a fingerprint of the base model (its shape
and a fixed sample of its weights) so that an adapter is not silently applied to a different model:
shapes must match exactly, and the sampled weights must agree to within quantization noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from scratchlm.config import ModelConfig
from scratchlm.errors import ModelFileError, UnsupportedError
from scratchlm.files import atomic_write_bytes, atomic_write_json
from scratchlm.finetune.lora import TARGETS, LoRALinear, LoraSettings, lora_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
FINGERPRINT_KEY = "scratchlm.base_fingerprint"
SAMPLE_TENSORS = ("tok_embeddings.weight", "blocks.0.attn.q_proj.weight", "blocks.{last}.mlp.down_proj.weight")
SAMPLE_SIZE = 64
# Weights sampled from the same model agree to ~10% after 4-bit quantization; unrelated ones differ by ~140%.
SAME_BASE_TOLERANCE = 0.3
# HF module path of each short target inside a Llama decoder layer.
HF_MODULES = {short: path.replace("attn.", "self_attn.") for short, path in TARGETS.items()}


def check_peft_layout(config: ModelConfig) -> None:
    """PEFT's key names exist for Llama-layout models; refuse others with what to do instead."""
    if config.positions != "rope":
        raise UnsupportedError("LoRA adapters are written in PEFT's format for Llama-layout models (rotary "
                               "positions); this is a GPT-2-layout model: fine-tune it with --method full")


def hf_module_name(module: str) -> str:
    """``blocks.3.attn.q_proj`` -> ``model.layers.3.self_attn.q_proj``."""
    _, index, *rest = module.split(".")
    return f"model.layers.{index}." + ".".join(rest).replace("attn.", "self_attn.", 1)


def canonical_module_name(hf_module: str) -> str | None:
    """``model.layers.3.self_attn.q_proj`` -> ``blocks.3.attn.q_proj`` (None for anything else)."""
    parts = hf_module.split(".")
    if len(parts) != 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        return None
    path = f"{parts[3]}.{parts[4]}".replace("self_attn.", "attn.")
    return f"blocks.{parts[2]}.{path}" if path in TARGETS.values() else None


# ---- fingerprint of the base -------------------------------------------------------------------------------
def _weight_of(model: nn.Module, name: str) -> torch.Tensor:
    module = model.get_submodule(name.rsplit(".", 1)[0])
    if isinstance(module, LoRALinear):
        module = module.base
    if hasattr(module, "weight_float"):  # an NF4 layer
        return module.weight_float(torch.float32)
    return module.weight.detach().float()


def base_fingerprint(model: nn.Module) -> dict:
    """The base model's shape and 64 weights at fixed positions of three tensors (JSON-ready)."""
    cfg = model.config
    sample = {}
    for pattern in SAMPLE_TENSORS:
        name = pattern.format(last=cfg.n_layers - 1)
        flat = _weight_of(model, name).reshape(-1)
        positions = torch.randint(0, flat.numel(), (SAMPLE_SIZE,), generator=torch.Generator().manual_seed(0))
        sample[name] = [round(v, 7) for v in flat[positions].tolist()]
    return {"architecture": architecture(cfg), "sample": sample}


def architecture(config: ModelConfig) -> dict:
    keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "mlp", "positions")
    return {k: getattr(config, k) for k in keys}


def check_same_base(saved: dict, model: nn.Module, adapter_dir: Path) -> None:
    """Raise a ModelFileError unless ``model`` is the base the adapter's fingerprint describes."""
    now = architecture(model.config)
    diffs = [f"{k} {saved['architecture'].get(k)!r} vs {v!r}" for k, v in now.items()
             if saved["architecture"].get(k) != v]
    if diffs:
        raise ModelFileError(f"adapter {adapter_dir} was made for a different base model ({'; '.join(diffs)} in the "
                             "adapter vs this model): load it onto the model it was trained from")
    current = base_fingerprint(model)["sample"]
    ref = torch.tensor([v for name in current for v in saved["sample"].get(name, [])])
    now_values = torch.tensor([v for values in current.values() for v in values])
    if ref.numel() != now_values.numel():
        return
    distance = ((now_values - ref).norm() / ref.norm().clamp(min=1e-12)).item()
    if distance > SAME_BASE_TOLERANCE:
        raise ModelFileError(f"adapter {adapter_dir} was made for a different base model: the base weights it "
                             f"recorded differ from this model's by {distance:.0%} (same-model copies differ by "
                             f"under {SAME_BASE_TOLERANCE:.0%}); load it onto the model it was trained from")


# ---- writing ---------------------------------------------------------------------------------------------------
def save_adapter(directory: str | Path, model: nn.Module, settings: LoraSettings, base_name: str | None = None,
                 fingerprint: dict | None = None) -> Path:
    """Write the model's LoRA weights and settings as a PEFT adapter directory.

    Args:
        base_name: ``base_model_name_or_path`` in the config (where PEFT users find the base model).
        fingerprint: ``base_fingerprint`` of the float base, taken before any quantization (default: now).
    """
    from safetensors.torch import save

    check_peft_layout(model.config)
    layers = lora_layers(model)
    if not layers:
        raise UnsupportedError("the model has no LoRA layers to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in layers.items():
        key = PREFIX + hf_module_name(name)
        tensors[key + ".lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        tensors[key + ".lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
    metadata = {"format": "pt", FINGERPRINT_KEY: json.dumps(fingerprint or base_fingerprint(model))}
    atomic_write_bytes(directory / WEIGHTS_FILE, save(tensors, metadata=metadata))
    atomic_write_json(directory / CONFIG_FILE, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name, "revision": None,
        "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "target_modules": sorted({HF_MODULES[t].split(".")[1] for t in settings.targets}),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": settings.use_rslora, "use_dora": False, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    })
    return directory


# ---- reading ---------------------------------------------------------------------------------------------------
def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]], dict | None]:
    """(config, {canonical module: (A, B)}, base fingerprint or None) of a PEFT LoRA adapter directory."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise ModelFileError(f"{directory} is not a LoRA adapter: {CONFIG_FILE} is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{config_path} is not valid JSON: {exc}") from None
    _check_supported(config, config_path)
    if not weights_path.is_file():
        hint = " (pickled adapter_model.bin files are not read)" if (directory / "adapter_model.bin").exists() else ""
        raise ModelFileError(f"missing adapter weights: {weights_path}{hint}")
    try:
        with safe_open(str(weights_path), "pt") as f:
            metadata = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{weights_path} is not a readable safetensors file: {exc}") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        stem = key[len(PREFIX):] if key.startswith(PREFIX) else key
        module, _, kind = stem.rpartition(".lora_")
        canonical = canonical_module_name(module)
        if canonical is None or kind not in ("A.weight", "B.weight"):
            raise ModelFileError(f"{weights_path}: unexpected tensor {key!r}; scratchlm reads LoRA A/B weights of "
                                 "Llama attention and MLP projections (model.layers.N.self_attn.q_proj ...)")
        pairs.setdefault(canonical, {})[kind[0]] = tensor
    incomplete = [m for m, ab in pairs.items() if set(ab) != {"A", "B"}]
    if not pairs:
        raise ModelFileError(f"{weights_path} holds no LoRA weights")
    if incomplete:
        raise ModelFileError(f"{weights_path}: lora_A or lora_B is missing for {incomplete[:3]}")
    fingerprint = json.loads(metadata[FINGERPRINT_KEY]) if FINGERPRINT_KEY in metadata else None
    return config, {m: (ab["A"], ab["B"]) for m, ab in pairs.items()}, fingerprint


def _check_supported(config: dict, path: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise UnsupportedError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    refused = {
        "use_dora": "DoRA", "lora_bias": "LoRA biases", "alpha_pattern": "per-module alpha (alpha_pattern)",
        "modules_to_save": "fully trained extra modules (modules_to_save)",
        "trainable_token_indices": "trainable token embeddings",
    }
    for key, what in refused.items():
        if config.get(key):
            raise UnsupportedError(f"{path}: {what} is not supported; train an adapter without it")
    if config.get("bias", "none") != "none":
        raise UnsupportedError(f"{path}: bias {config['bias']!r} is not supported (only 'none')")
    if config.get("fan_in_fan_out"):
        raise UnsupportedError(f"{path}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")


def load_adapter(model: nn.Module, directory: str | Path, merge: bool = True, check_base: bool = True) -> LoraSettings:
    """Apply a PEFT LoRA adapter to ``model`` (canonical Transformer): merged into the weights by default,
    or as trainable ``LoRALinear`` layers (``merge=False``). Returns its settings.

    Refuses (ModelFileError, naming the difference) an adapter whose shapes or recorded base weights do not
    match this model.
    """
    directory = Path(directory)
    check_peft_layout(model.config)
    config, pairs, fingerprint = read_adapter(directory)
    if check_base and fingerprint is not None:
        check_same_base(fingerprint, model, directory)
    cfg = model.config
    alpha = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    for name, (a, b) in pairs.items():
        index = int(name.split(".")[1])
        if index >= cfg.n_layers:
            raise ModelFileError(f"adapter {directory} was made for a different base model: it has layer {index}, "
                                 f"this model has {cfg.n_layers} layers")
        module = model.get_submodule(name)
        base = module.base if isinstance(module, LoRALinear) else module
        rank = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != rank or \
                (a.shape[1], b.shape[0]) != (base.in_features, base.out_features):
            raise ModelFileError(
                f"adapter {directory} was made for a different base model: {hf_module_name(name)} has A "
                f"{list(a.shape)} and B {list(b.shape)}, this model's layer is [{base.out_features}, "
                f"{base.in_features}]")
    paths = {n.split(".", 2)[2] for n in pairs}
    ranks = {a.shape[0] for a, _ in pairs.values()}
    settings = LoraSettings(rank=int(config.get("r") or max(ranks)), alpha=alpha,
                            dropout=float(config.get("lora_dropout", 0.0)),
                            targets=tuple(s for s, p in TARGETS.items() if p in paths), use_rslora=rslora)
    for name, (a, b) in pairs.items():
        module = model.get_submodule(name)
        rank = a.shape[0]  # rank_pattern may give layers their own rank: the shapes say which
        if merge:
            if not isinstance(module, nn.Linear):
                raise UnsupportedError(f"cannot merge an adapter into {name} ({type(module).__name__}): load the float "
                                       "model with the adapter, then quantize (LLM.load(..., adapter=, quantize=))")
            scaling = alpha / (math.sqrt(rank) if rslora else rank)
            with torch.no_grad():
                merged = module.weight.float() + (b.float() @ a.float()) * scaling
                module.weight.copy_(merged.to(module.weight.dtype))
            continue
        layer = module if isinstance(module, LoRALinear) else LoRALinear(module, rank, alpha, 0.0, rslora)
        if layer.rank != rank:
            raise ModelFileError(f"adapter {directory}: {name} has rank {rank}, the model's LoRA layer {layer.rank}")
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        if layer is not module:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer)
    return settings
