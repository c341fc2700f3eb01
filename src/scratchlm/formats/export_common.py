"""What every exporter shares: which outside architecture a model maps to, and all-or-nothing writes.

Writes go to a temporary file or directory beside the destination and are renamed into place only
when complete, so a failed export (disk full, a bug, Ctrl-C) leaves the destination as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import ConfigError, ScratchLMError, UnsupportedError

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


def check_destination(path: Path, force: bool, want_dir: bool) -> None:
    """Refuse to overwrite without ``force``, and never replace a file by a directory or the reverse."""
    if not path.exists() and not path.is_symlink():
        return
    kind = "directory" if path.is_dir() else "file"
    if not force:
        raise ConfigError(f"{path} already exists; pass --force to replace it")
    if want_dir != path.is_dir():
        raise ConfigError(f"{path} is a {kind}; the export would write a {'directory' if want_dir else 'file'} "
                          "there: choose another --out")
    if want_dir and any(path.iterdir()) and not (path / "config.json").is_file():
        raise ConfigError(f"{path} is a directory that does not hold a model (no config.json); "
                          "refusing to replace it even with --force: choose another --out")


def _make_parents(path: Path) -> list[Path]:
    """Create the missing parents of ``path``; returns them, deepest first, for cleanup after a failure."""
    created = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:
        with contextlib.suppress(OSError):
            d.rmdir()  # only succeeds when empty


def _umask_mode(base: int) -> int:
    """``base`` less the process umask: the mode a plain open() or mkdir() would give (mkstemp and mkdtemp
    make private 0600/0700 entries, which would surprise whoever shares an export)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _write_failed(path: Path, exc: OSError) -> ScratchLMError:
    return ScratchLMError(f"could not write {path}: {exc.strerror or exc}; nothing was written")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on any failure it is deleted."""
    path = Path(path)
    check_destination(path, force, want_dir=False)
    created = _make_parents(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.chmod(_umask_mode(0o666))
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _remove_empty(created)
        if isinstance(exc, OSError):
            raise _write_failed(path, exc) from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces ``path``, on any failure it is deleted."""
    path = Path(path)
    check_destination(path, force, want_dir=True)
    created = _make_parents(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        tmp.chmod(_umask_mode(0o777))
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():  # writers that go through mkstemp leave 0600 files
                f.chmod(_umask_mode(0o666))
        if path.exists():
            # Two renames: the old export stays whole until the new one is complete and in place.
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / "previous")
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old / "previous", path)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if isinstance(exc, OSError):
            raise _write_failed(path, exc) from None
        raise


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
