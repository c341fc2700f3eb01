"""What every benchmark script here shares: the machine's name, and appending a section to RESULTS.md.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on their import path.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    """CPU model and core count, e.g. "AMD EPYC 9B45, 2 cores"."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def append_results(text: str) -> None:
    """Append ``text`` (a Markdown section) to benchmarks/RESULTS.md, creating the file if needed."""
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in this folder; newest last. Ratios "
                           "compare engines measured in the same run.\n", encoding="utf-8")
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(text)
    print(f"appended to {RESULTS}")


def section_header(details: str = "") -> str:
    """The opening of a RESULTS.md section: the script's name and the time, the machine, torch's version, the
    command exactly as it was run, and ``details`` (a sentence of what else the run used)."""
    import torch

    script = Path(sys.argv[0]).name
    now = datetime.datetime.now(datetime.timezone.utc)
    command = " ".join([f".venv/bin/python benchmarks/{script}", *sys.argv[1:]])
    return (f"\n## {script}, {now:%Y-%m-%d %H:%M} UTC\n\nMachine: {machine()}. torch {torch.__version__}"
            f"{'. ' + details if details else ''}. Command: `{command}`.\n\n")
