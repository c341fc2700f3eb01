"""Merging: base model + LoRA adapter -> one ordinary model directory (W + alpha/r B @ A in every layer).

The merged model runs at the base model's speed with no adapter code, and exports like any other
(``scratchlm convert merged --to hf|gguf``).
"""

from __future__ import annotations

import os
from pathlib import Path


def merge_to_directory(base: str | os.PathLike, adapter: str | os.PathLike, out: Path, force: bool = False,
                       progress: bool = False) -> Path:
    """Load ``base`` with ``adapter`` merged and write it to ``out`` (a scratchlm model directory).

    The directory is written under a temporary name and renamed when complete. An existing ``out`` is
    replaced only with ``force``, and only when it holds a model (never an arbitrary folder).
    ``progress``: say on stderr what is being done and how long it took.
    """
    from scratchlm.files import atomic_dir, check_destination
    from scratchlm.formats.checkpoint import save_model_dir
    from scratchlm.llm import LLM
    from scratchlm.progress import stage

    out = Path(out)
    check_destination(out, force, want_dir=True)  # before the slow load
    with stage(f"loading {base} with the adapter {adapter} merged in", progress):
        llm = LLM.load(base, adapter=adapter)
    with stage(f"writing {out}", progress), atomic_dir(out, force) as tmp:
        save_model_dir(tmp, llm.config, llm.model.canonical_state_dict(), llm.tokenizer, llm.template.source)
    return out
