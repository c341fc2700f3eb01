"""Where compiled decode steps live on disk, and how a stale or broken one is found and thrown away.

``torch.compile`` spends most of its first call in inductor: generating C++ for the fused loops and
compiling it (tens of seconds to minutes for SmolLM2 on two cores). Inductor keeps what it built in its
on-disk caches (the FX graph cache and the AOTAutograd cache, keyed by the graph, the torch version and the
CPU's vector ISA), so a later process that traces the same step skips code generation and the C++ compiler.
We give each model its own cache directory,

    $SCRATCHLM_HOME/compile/<key>/            key = hash of torch version, CPU, model shape, quantization,
        manifest.json                              dtype and the source of scratchlm.compiled
        (inductor's files)

so that ``scratchlm`` never shares or pollutes ``/tmp/torchinductor_$USER``, a stale directory (another torch,
another CPU, a changed decode step) is recognised by its manifest and rebuilt, and a directory that breaks a
compile can be deleted whole. Inductor writes its entries atomically under file locks, so two processes that
compile the same model at once both succeed (tests/test_fast_default.py).
"""

from __future__ import annotations

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
    import scratchlm.compiled

    return hashlib.sha256(Path(scratchlm.compiled.__file__).read_bytes()).hexdigest()[:16]


def describe(model) -> dict:
    """What a compiled decode step depends on: the manifest of its cache directory."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    quant = getattr(model, "quantization", None)
    return {"torch": torch.__version__, "cpu": cpu_name(), "config": model.config.to_dict(),
            "quantization": {k: quant.get(k) for k in ("mode", "group_size", "int8_layers")} if quant else None,
            "dtype": str(dtype), "step": _step_source_hash()}


def cache_dir(model) -> Path:
    """``$SCRATCHLM_HOME/compile/<key>`` for this model on this machine and torch."""
    from scratchlm.hub import home

    manifest = describe(model)
    manifest["config"] = {k: v for k, v in manifest["config"].items() if k != "name"}  # same shape, same step
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]
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
