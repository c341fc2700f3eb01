"""Data curation for pretraining: exact and near-duplicate removal, Gopher quality rules, JSONL shards.

The folder also holds the bundled training corpus (``shakespeare.txt``, see ``train/sources.py``).
"""

import importlib

# Loaded on first use (PEP 562), so that `scratchlm --help`, which imports data/cli.py, does not import numpy.
_EXPORTS = {"CleanOptions": "clean", "clean_corpus": "clean", "format_report": "clean", "QualityRules": "quality"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
