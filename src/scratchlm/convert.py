"""``scratchlm convert``: export any model that ``LLM.load`` reads to HF transformers, GGUF or ONNX.

    scratchlm convert smollm2-135m-instruct --to hf --out exports/smollm2-hf
    scratchlm convert runs/shakespeare/best --to gguf --gguf-type q8_0 --out exports/shakespeare.q8_0.gguf
    scratchlm convert exports/smollm2-hf --to onnx --seq-len 64 --out exports/smollm2.onnx

The source is loaded into the canonical representation in float32 (a quantized GGUF is dequantized),
then written by ``formats/export_hf.py``, ``formats/export_gguf.py`` or ``formats/onnx.py``. Every output
is written beside its destination under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from scratchlm.cli_options import add_force_flag, add_progress_flag, add_threads_flag, show_progress
from scratchlm.errors import ConfigError

TARGETS = ("hf", "gguf", "onnx")
HF_DTYPES = ("float32", "float16", "bfloat16")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")


def convert(source: str | Path, to: str, out: str | Path, dtype: str | None = None, gguf_type: str | None = None,
            force: bool = False, batch_size: int = 1, seq_len: int | None = None, progress: bool = False) -> Path:
    """Export ``source`` (a known name, .gguf file, HF or scratchlm directory) to ``out``; returns ``out``.

    Args:
        to: "hf" (a directory), "gguf" or "onnx" (a file).
        dtype: stored weight dtype of an HF export (default float32).
        gguf_type: tensor type of a GGUF export: f32, f16 (default), q8_0, q4_0 or q4_1.
        force: replace an existing ``out``.
        batch_size, seq_len: the fixed input shape of an ONNX export.
        progress: say on stderr what is being done and how long it took.
    """
    from scratchlm.files import check_destination
    from scratchlm.llm import LLM, parse_dtype
    from scratchlm.progress import stage

    if to not in TARGETS:
        raise ConfigError(f"unknown export target {to!r}; choose one of {', '.join(TARGETS)}")
    if dtype is not None and to != "hf":
        hint = "use --gguf-type for GGUF" if to == "gguf" else "ONNX weights are float32"
        raise ConfigError(f"--dtype applies to --to hf only; {hint}")
    if gguf_type is not None and to != "gguf":
        raise ConfigError("--gguf-type applies to --to gguf only")
    if dtype is not None and dtype not in HF_DTYPES:
        raise ConfigError(f"unknown --dtype {dtype!r}; choose one of {', '.join(HF_DTYPES)}")
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise ConfigError(f"unknown --gguf-type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    check_destination(out, force, want_dir=to == "hf")  # before spending time on loading the source

    with stage(f"loading {source}", progress):
        llm = LLM.load(source, dtype="float32")
    with stage(f"writing {to} to {out}", progress):
        if to == "hf":
            from scratchlm.formats.export_hf import export_hf

            return export_hf(llm, out, dtype=parse_dtype(dtype or "float32"), force=force)
        if to == "gguf":
            from scratchlm.formats.export_gguf import export_gguf

            return export_gguf(llm, out, gguf_type=gguf_type or "f16", force=force)
        from scratchlm.formats.onnx import export_onnx

        return export_onnx(llm, out, batch_size=batch_size, seq_len=seq_len, force=force)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def cmd_convert(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    out = convert(args.source, args.to, args.out, dtype=args.dtype, gguf_type=args.gguf_type, force=args.force,
                  batch_size=args.batch_size, seq_len=args.seq_len, progress=show_progress(args))
    print(f"wrote {out} ({_size(out) / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f}s")


def register(subparsers) -> None:
    """Add ``scratchlm convert`` to the CLI."""
    p = subparsers.add_parser("convert", help="export a model to HF transformers, GGUF (llama.cpp) or ONNX",
                              description="Export a model that scratchlm loads to HF transformers, GGUF or ONNX.")
    p.add_argument("source", help="known model name, .gguf file, HF directory, or scratchlm/training checkpoint")
    p.add_argument("--to", required=True, choices=TARGETS, help="output format")
    p.add_argument("--out", required=True, help="output directory (hf) or file (gguf, onnx)")
    p.add_argument("--dtype", default=None, choices=HF_DTYPES, help="hf: stored weight dtype (default float32)")
    p.add_argument("--gguf-type", default=None, choices=GGUF_TYPES,
                   help="gguf: tensor type (default f16); q4_* keep the embedding at q8_0")
    add_force_flag(p)
    add_threads_flag(p)
    add_progress_flag(p)
    p.add_argument("--batch-size", type=int, default=1, help="onnx: fixed batch size (default 1)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="onnx: fixed sequence length (default: context length, at most 256)")
    p.set_defaults(func=cmd_convert)
