"""What every benchmark script here shares: the machine's name, and appending a section to RESULTS.md.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on their import path.
"""

from __future__ import annotations

import os
import platform
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
