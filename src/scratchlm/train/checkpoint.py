"""Training checkpoints: a model directory that ``LLM.load`` reads, plus what resuming needs.

    runs/x/last/                 (and runs/x/best/: the model with the lowest validation loss)
        model_config.json        \
        model.safetensors         | scratchlm.formats.checkpoint.save_model_dir: loads with LLM.load
        tokenizer.json            |
        tokenizer_config.json    /
        optimizer.safetensors    AdamW moments and step counts, "<param name>::<key>" (last/ only)
        trainer_state.json       step, best validation loss, data position, RNG states of Python,
                                 NumPy and torch on every process, training and model configuration

Nothing is pickled. A checkpoint is written into a temporary directory and renamed into place, so a crash
or a full disk at any moment leaves the previous checkpoint whole; ``resolve_checkpoint`` also finds it
in the one window where it has been moved aside but the new one is not yet in place.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import ModelFileError, TrainingError
from scratchlm.files import atomic_write_bytes, atomic_write_json
from scratchlm.formats.checkpoint import CONFIG_FILE

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


# ---- random number generators ---------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng() -> dict:
    """The state of Python's, NumPy's and torch's global generators (CUDA too), as JSON-ready data."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    """Put back generator states captured by ``capture_rng``."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ---- writing ----------------------------------------------------------------------------------------
def write_checkpoint(directory: str | Path, save_model: Callable[[Path], None],
                     optimizer_state: dict[str, torch.Tensor] | None, trainer_state: dict) -> Path:
    """Write a checkpoint directory atomically (temporary directory, then rename).

    Args:
        save_model: writes the model files into the directory it is given (``save_model_dir``).
        optimizer_state: flat tensors from ``optim.optimizer_tensors``, or None to leave them out.
        trainer_state: JSON-ready step, RNG, data position and configuration.
    """
    from safetensors.torch import save

    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_model(tmp)
        if optimizer_state is not None:
            atomic_write_bytes(tmp / OPTIMIZER_FILE, save(optimizer_state, metadata={"format": "scratchlm"}))
        atomic_write_json(tmp / STATE_FILE, trainer_state)
        _fsync_dir(tmp)
    except (OSError, RuntimeError, ValueError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = f"the previous checkpoint in {final} is intact" if final.exists() else "no checkpoint was kept"
        raise TrainingError(f"could not write checkpoint {final} ({exc}); {previous}. Free disk space or "
                            "choose another --out, then resume") from None
    # Swap: move the old checkpoint aside, the new one into place, then delete the old one.
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- reading ----------------------------------------------------------------------------------------
def resolve_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint directory to resume from, or None (also finds one moved aside mid-swap)."""
    final = Path(directory)
    old = final.with_name(f".{final.name}.old")
    for candidate in (final, old):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def read_trainer_state(directory: str | Path) -> dict:
    """The JSON trainer state of a checkpoint directory."""
    path = Path(directory) / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{path} does not exist: {directory} is not a training checkpoint") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is not readable JSON ({exc}); the checkpoint is corrupt") from None


def read_optimizer_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """The flat optimizer tensors of a checkpoint directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / OPTIMIZER_FILE
    if not path.is_file():
        raise ModelFileError(f"{path} is missing: resume from a 'last' checkpoint, which holds the optimizer")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not a readable safetensors file ({exc})") from None


def config_differences(saved: dict, current: ModelConfig) -> list[str]:
    """Human-readable differences between a saved model config and the current one (name ignored)."""
    now = current.to_dict()
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if key == "name":
            continue
        if saved.get(key) != now.get(key):
            diffs.append(f"{key} {saved.get(key)!r} in the checkpoint vs {now.get(key)!r} now")
    return diffs


def check_resume_config(directory: str | Path, current: ModelConfig) -> None:
    """Raise a TrainingError saying what differs when a checkpoint's model config is not ``current``."""
    path = Path(directory) / CONFIG_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"cannot read {path} ({exc}); the checkpoint is corrupt") from None
    diffs = config_differences(saved, current)
    if diffs:
        raise TrainingError(f"cannot resume from {directory}: the model configuration differs ({'; '.join(diffs)}); "
                            "resume with the same preset and model flags, or train into a new --out")
