"""scratchlm's own model directory: the canonical state dict as safetensors, plus JSON.

    model_config.json        ModelConfig.to_dict()
    model.safetensors        canonical parameter names (a tied LM head is stored once)
    tokenizer.json           HF-compatible tokenizer (see scratchlm.tokenizer)
    tokenizer_config.json    chat_template, bos_token, eos_token (optional)

Training checkpoints add optimizer and trainer state beside these files; every file is written to a
temporary name and renamed into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import ModelFileError
from scratchlm.files import atomic_write_bytes, atomic_write_json, read_json

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "model.safetensors"


def save_model_dir(directory: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                   tokenizer=None, chat_template: str | None = None) -> Path:
    """Write a model directory that ``LLM.load`` reads."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write_bytes(directory / WEIGHTS_FILE, save(tensors, metadata={"format": "scratchlm"}))
    atomic_write_json(directory / CONFIG_FILE, config.to_dict())
    if tokenizer is not None:
        tokenizer.save(directory / "tokenizer.json")
        atomic_write_json(directory / "tokenizer_config.json", {
            "chat_template": chat_template, "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
        })
    return directory


def is_model_dir(directory: Path) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file()


def load_model_dir(directory: str | Path,
                   dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read the config and canonical weights of a scratchlm model directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = ModelConfig.from_dict(read_json(directory / CONFIG_FILE))
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFileError(f"missing weights file: {weights}")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    return config, {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
