"""Checkpoints that outlive the process layout: ``torch.distributed.checkpoint`` (DCP).

Every process writes its own shards of the model and optimizer state into ``CHECKPOINT/distcp/`` in parallel,
with a metadata file that says where each piece of each tensor lies (global offsets and sizes). Loading plans
the reads the other way round: each process of the new layout (1 process, 4 FSDP ranks, 2 tensor-parallel
ranks, a pipeline stage) asks for the pieces that cover its own shards, so a run saved with one world size
resumes with another. Names are the model's canonical parameter names, whatever the mode (a pipeline stage
keeps them), and the optimizer's states are keyed by them too (``torch.distributed.checkpoint.state_dict``).

The model directory beside it (``model.safetensors``, read by ``LLM.load``, ``export``) is made by rank 0 from
the DCP files, so a sharded run exports as any other.

DCP's metadata file is a Python pickle; ``SafeReader`` reads it with an unpickler that builds only DCP's
metadata classes and a few torch types (the rule: nothing untrusted is unpickled).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from scratchlm.errors import ModelFileError

DCP_DIR = "distcp"

# What DCP's metadata pickle holds (torch 2.13, listed from a saved file): its dataclasses, paths, torch.Size, dtypes.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": None,  # every class of the module (plain dataclasses and an enum)
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size", "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8",
              "uint16", "uint32", "bool", "strided"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get(module, set())
        if allowed is None or name in allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def safe_reader(path: str | Path):
    """A DCP FileSystemReader whose metadata is read without running arbitrary pickled code."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            file = self._get_metadata_path(kwargs.get("rank"))
            try:
                with self.fs.create_stream(file, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, OSError, AttributeError) as exc:
                raise ModelFileError(f"{file} is not a readable checkpoint index ({exc})") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Every process writes its shards of ``model`` (and ``optimizer``) into ``path`` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Read ``path`` into this process's shards of ``model`` and ``optimizer``, whatever layout wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    _drop_tied_head(state["model"], model)
    try:
        dcp.load(state, checkpoint_id=str(path), storage_reader=safe_reader(path))
    except (RuntimeError, ValueError, KeyError) as exc:  # DCP wraps per-rank failures in CheckpointException
        raise ModelFileError(f"cannot read the sharded checkpoint {path}: {str(exc).splitlines()[0][:300]}; "
                             "resume with the same model flags, or start a new run") from None
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=_non_strict())
        return
    # How the step runs (fused kernel or not) belongs to this layout, not to the one that saved.
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_non_strict())
    for group, kernel in zip(optimizer.param_groups, kernels):
        group.update(kernel)


def _non_strict():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=False)  # a tied head has one entry under two names


def _drop_tied_head(model_sd: dict, model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is not None and config.tie_embeddings:
        model_sd.pop("lm_head.weight", None)


def read_full_state_dict(path: str | Path, config) -> dict[str, torch.Tensor]:
    """The whole model's canonical state dict from a DCP checkpoint, read by one process (for model.safetensors)."""
    import torch.distributed.checkpoint as dcp

    from scratchlm.model import Transformer

    with torch.device("meta"):
        skeleton = Transformer(config)
    state = {name: torch.empty(t.shape, dtype=t.dtype) for name, t in skeleton.canonical_state_dict().items()}
    dcp.load({"model": state}, checkpoint_id=str(path), storage_reader=safe_reader(path), no_dist=True)
    return state


def prepare_staging(checkpoint: Path, dist) -> Path:
    """An empty directory beside ``checkpoint`` for every process's shards (rank 0 empties it, all wait)."""
    import shutil

    from scratchlm.train.distributed import barrier

    staging = checkpoint.with_name(f".{checkpoint.name}.{DCP_DIR}-tmp")
    if dist.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier(dist)
    return staging


def with_sharded_state(save_model, staging: Path):
    """A ``save_model`` for ``write_checkpoint`` that first moves the shards into the new checkpoint directory.

    ``save_model`` then finds them in ``directory / distcp`` and reads the whole model from them.
    """
    import os

    def write(directory: Path) -> None:
        os.rename(staging, directory / DCP_DIR)
        save_model(directory)

    return write


def model_weights(directory: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The canonical weights to write into ``directory``'s model files: from its shards when it has them."""
    if (Path(directory) / DCP_DIR).is_dir():
        return read_full_state_dict(Path(directory) / DCP_DIR, model.config)
    return model.canonical_state_dict()


def load_zero1_tensors(optimizer, names: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Load flat optimizer tensors (``optim.optimizer_tensors``'s) into a ZeroRedundancyOptimizer.

    Its ``load_state_dict`` takes the whole state and keeps each process's own part.
    """
    from scratchlm.errors import TrainingError

    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    index_of = {name: i for i, name in enumerate(order)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for flat_key, value in tensors.items():
        name, _, key = flat_key.rpartition("::")
        if name not in index_of:
            raise TrainingError(f"the saved optimizer state has an entry for {name!r}, which is not trained now")
        state.setdefault(index_of[name], {})[key] = value
    groups, start = [], 0
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
