"""Datasets of the offline harness tasks: each task YAML names ``custom_dataset: !function loader.load`` and
its JSONL file (built by ``scripts/make_harness_tasks.py``), which lies beside this module."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(file: str, **metadata):
    """The JSONL file ``file`` (beside this module) as a ``DatasetDict`` with one ``test`` split; lm-eval also
    passes its ``metadata`` (task version, model arguments), which is not needed here."""
    import datasets

    with open(HERE / file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
