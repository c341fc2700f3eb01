"""``scratchlm quantize MODEL --to int8|int4 [--group-size G] --out DIR [--force]``: write a quantized checkpoint.

The directory is written under a temporary name beside ``--out`` and renamed into place when complete; an
existing ``--out`` is replaced only with ``--force`` (and only when it holds a model).
"""

from __future__ import annotations

import argparse
import time

from scratchlm.cli_options import (
    add_force_flag,
    add_group_size_flag,
    add_progress_flag,
    add_threads_flag,
    show_progress,
)


def quantize_to_directory(model: str, mode: str, out, group_size: int | None = None, force: bool = False,
                          progress: bool = False):
    """Load ``model`` in float32, quantize it (a progress bar per layer) and write it to ``out``; returns the LLM."""
    from scratchlm.files import atomic_dir, check_destination
    from scratchlm.llm import LLM
    from scratchlm.progress import stage
    from scratchlm.quant import quantize_model, save_quantized
    from scratchlm.quant.quantize import check_options

    check_options(mode, group_size)  # fail before the (slow) load
    check_destination(out, force, want_dir=True)
    # Quantize from float32 so that the stored scales are exact; the dtype to compute in is chosen at load.
    with stage(f"loading {model}", progress):
        llm = LLM.load(model, dequantize=True, compile=False)
    quantize_model(llm.model, mode, group_size, progress=progress)
    with stage(f"writing {out}", progress), atomic_dir(out, force) as tmp:
        save_quantized(tmp, llm.model, llm.tokenizer, llm.template.source)
    return llm


def cmd_quantize(args: argparse.Namespace) -> None:
    from pathlib import Path

    start = time.perf_counter()
    out = Path(args.out)
    llm = quantize_to_directory(args.model, args.to, out, args.group_size, args.force, show_progress(args))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    group = f", group size {llm.model.quantization['group_size']}" if args.to == "int4" else ""
    print(f"wrote {out} ({args.to}{group}, {size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s; "
          f"load it with LLM.load({str(out)!r}) or any command, e.g. scratchlm chat {out}")


def register(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="write an int8 or int4 weight-only quantized copy of a model")
    p.add_argument("model", help="known model name, .gguf file, or model directory (float weights)")
    p.add_argument("--to", required=True, choices=["int8", "int4"], help="int8 per channel or int4 group-wise")
    add_group_size_flag(p)
    p.add_argument("--out", required=True, help="output directory (LLM.load and every command read it)")
    add_force_flag(p)
    add_threads_flag(p)
    add_progress_flag(p)
    p.set_defaults(func=cmd_quantize)
