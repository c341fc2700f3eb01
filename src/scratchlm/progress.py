"""Feedback for long work, on stderr: a progress bar where the work counts, a timed line where it does not.

    with stage("loading smollm2-135m-instruct", enabled):   # "loading smollm2-135m-instruct ..." then "... 3.1 s"
        llm = LLM.load(...)
    for layer in bar(layers, "quantizing", enabled, unit="layer"): ...

Progress is for a person watching: it goes to stderr (stdout stays clean for pipes) and is off when stderr is
not a terminal or with ``--no-progress`` (``cli_options.show_progress``).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator


@contextlib.contextmanager
def stage(text: str, enabled: bool = True) -> Iterator[None]:
    """Print ``text ...`` before a step and its duration after it (nothing when not ``enabled``)."""
    if not enabled:
        yield
        return
    print(f"{text} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def bar(items: Iterable, desc: str, enabled: bool = True, total: int | None = None, unit: str = "it"):
    """``items`` wrapped in a tqdm bar on stderr with rate and ETA (the items themselves when not ``enabled``)."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True)
