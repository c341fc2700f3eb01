"""Data curation for pretraining: exact and near-duplicate removal, Gopher quality rules, JSONL shards.

The folder also holds the bundled training corpus (``shakespeare.txt``, see ``train/sources.py``).
"""

from scratchlm.lazy import lazy_exports

# Loaded on first use (PEP 562), so that `scratchlm --help`, which imports data/cli.py, does not import numpy.
_EXPORTS = {"CleanOptions": "clean", "clean_corpus": "clean", "format_report": "clean", "QualityRules": "quality"}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
