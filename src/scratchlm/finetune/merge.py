"""Merging: base model + LoRA adapter -> one ordinary model directory (W + alpha/r B @ A in every layer).

The merged model runs at the base model's speed with no adapter code, and exports like any other
(``scratchlm convert merged --to hf|gguf``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from scratchlm.errors import ConfigError


def merge_to_directory(base: str | os.PathLike, adapter: str | os.PathLike, out: Path, force: bool = False) -> Path:
    """Load ``base`` with ``adapter`` merged and write it to ``out`` (a scratchlm model directory).

    The directory is written under a temporary name and renamed when complete. An existing ``out`` is
    replaced only with ``force``, and only when it holds a model (never an arbitrary folder).
    """
    from scratchlm.formats.checkpoint import is_model_dir, save_model_dir
    from scratchlm.llm import LLM

    out = Path(out)
    if out.exists():
        if not force:
            raise ConfigError(f"{out} already exists: pass --force to replace it, or choose another --out")
        if not is_model_dir(out):
            raise ConfigError(f"{out} exists and is not a model directory; refusing to replace it")
    llm = LLM.load(base, adapter=adapter)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model_dir(tmp, llm.config, llm.model.canonical_state_dict(), llm.tokenizer, llm.template.source)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
