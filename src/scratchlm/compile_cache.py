"""Where compiled decode steps live on disk, and how a stale or broken one is found and thrown away.

Each model (by shape, quantization and dtype) gets its own directory on each machine and torch,

    $SCRATCHLM_HOME/compile/<key>/            key = hash of torch version, CPU, model shape, quantization,
        manifest.json                              dtype and the source of the step (compiled.py, aot.py)
        step-<batch>-<cache>-<strides>-t<n>.pt2    AOTInductor packages, per cache layout and thread count
        (inductor's cache files)                   what inductor keeps while compiling (and torch.compile's)

so that ``scratchlm`` never shares or pollutes ``/tmp/torchinductor_$USER``, a stale directory (another torch,
another CPU, a changed decode step) is recognised by its manifest and rebuilt, and a directory that breaks a
compile can be deleted whole. A package is built under a file lock (a second process waits, then loads it),
written under a temporary name and renamed into place; inductor writes its own entries atomically under file
locks: two processes that compile the same model at once both succeed (tests/test_fast_default.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

import torch

from scratchlm.files import atomic_write_json, read_json

MANIFEST = "manifest.json"


def cpu_name() -> str:
    """The CPU model and its instruction-set flags (generated kernels depend on both)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
        flags = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("flags")), "")
        return f"{model} [{hashlib.sha256(flags.encode()).hexdigest()[:12]}]"
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _step_source_hash() -> str:
    import scratchlm.aot
    import scratchlm.compiled

    digest = hashlib.sha256()
    for module in (scratchlm.compiled, scratchlm.aot):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def describe(model) -> dict:
    """What a compiled decode step depends on: the manifest of its cache directory."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    quant = getattr(model, "quantization", None)
    config = {k: v for k, v in model.config.to_dict().items() if k != "name"}  # same shape, same step
    return {"torch": torch.__version__, "cpu": cpu_name(), "config": config,
            "quantization": {k: quant.get(k) for k in ("mode", "group_size", "int8_layers")} if quant else None,
            "dtype": str(dtype), "step": _step_source_hash()}


def cache_dir(model) -> Path:
    """``$SCRATCHLM_HOME/compile/<key>`` for this model on this machine and torch."""
    from scratchlm.hub import home

    key = hashlib.sha256(json.dumps(describe(model), sort_keys=True).encode()).hexdigest()[:20]
    return home() / "compile" / key


def prepare(directory: Path, model) -> bool:
    """Make ``directory`` the one inductor caches into, for this process; a directory whose manifest does not
    describe ``model`` (stale or damaged) is emptied first. Returns whether a usable cache was already there."""
    manifest = describe(model)
    found = False
    if (directory / MANIFEST).is_file():
        try:
            found = read_json(directory / MANIFEST) == json.loads(json.dumps(manifest))
        except Exception:  # unreadable manifest: treat as stale
            found = False
        if not found:
            discard(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not found:
        atomic_write_json(directory / MANIFEST, manifest)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)  # inductor reads it at every cache access
    return found


def discard(directory: Path) -> None:
    """Delete a cache directory that failed (another process may be using it: errors are ignored)."""
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on ``path`` + ``.lock`` (blocking): one process builds a package at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
