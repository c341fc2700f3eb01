"""Quantized model directories: a scratchlm model directory plus ``quantization.json``.

    model_config.json        ModelConfig.to_dict(), unchanged
    quantization.json        {"format": "scratchlm-quant", "version": 1, "mode": "int4", "group_size": 64, ...}
    model.safetensors        portable quantized tensors (see quantize.py for the names)
    tokenizer.json, tokenizer_config.json

``LLM.load(directory)`` recognises the directory by ``quantization.json``. The tensors are in the portable
format, not in the CPU kernel's packed layout (that one depends on the CPU's vector width), so a file
written on one machine loads on any other; packing for the kernel happens at load and takes a second.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import ModelFileError
from scratchlm.formats import checkpoint
from scratchlm.quant.quantize import build_quantized_model, quantization_of, quantized_state_dict

QUANT_FILE = "quantization.json"
FORMAT = "scratchlm-quant"
VERSION = 1


def is_quantized_dir(directory: str | Path) -> bool:
    return (Path(directory) / QUANT_FILE).is_file() and checkpoint.is_model_dir(Path(directory))


def save_quantized(directory: str | Path, model, tokenizer=None, chat_template: str | None = None) -> Path:
    """Write a quantized model (and its tokenizer and chat template) to ``directory``; returns the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = dict(quantization_of(model) or {})
    tensors = quantized_state_dict(model)  # raises for a float model
    # quantization.json first: a crash after it leaves a directory that fails to load with a clear error,
    # never one whose int8 tensors are read as float weights.
    checkpoint.atomic_write_json(directory / QUANT_FILE, {"format": FORMAT, "version": VERSION, **info})
    return checkpoint.save_model_dir(directory, model.config, tensors, tokenizer, chat_template)


def load_quantized_dir(directory: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, object]:
    """Read a quantized model directory: ``(config, model)`` with layers ready to compute in ``dtype``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from scratchlm.formats.hf import read_json

    directory = Path(directory)
    info = read_json(directory / QUANT_FILE)
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise ModelFileError(f"{directory / QUANT_FILE}: not a scratchlm quantization file of version {VERSION}")
    config = ModelConfig.from_dict(read_json(directory / checkpoint.CONFIG_FILE))
    weights = directory / checkpoint.WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFileError(f"missing weights file: {weights}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    return config, build_quantized_model(config, tensors, info, dtype, source=str(weights))
