"""Data curation for pretraining: exact and near-duplicate removal, Gopher quality rules, JSONL shards.

The folder also holds the bundled training corpus (``shakespeare.txt``, see ``train/sources.py``).
"""

from scratchlm.data.clean import CleanOptions, clean_corpus, format_report
from scratchlm.data.quality import QualityRules

__all__ = ["CleanOptions", "QualityRules", "clean_corpus", "format_report"]
