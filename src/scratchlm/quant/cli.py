"""``scratchlm quantize MODEL --to int8|int4 [--group-size G] --out DIR``: write a quantized checkpoint."""

from __future__ import annotations

import argparse


def cmd_quantize(args: argparse.Namespace) -> None:
    from scratchlm.llm import LLM
    from scratchlm.quant import save_quantized
    from scratchlm.quant.quantize import check_options

    check_options(args.to, args.group_size)  # fail before the (slow) load
    # Quantize from float32 so that the stored scales are exact; the dtype to compute in is chosen at load.
    llm = LLM.load(args.model, quantize=args.to, group_size=args.group_size)
    out = save_quantized(args.out, llm.model, llm.tokenizer, llm.template.source)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    group = f", group size {llm.model.quantization['group_size']}" if args.to == "int4" else ""
    print(f"wrote {out} ({args.to}{group}, {size / 2**20:.1f} MiB); load it with LLM.load({str(out)!r})")


def register(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="write an int8 or int4 weight-only quantized copy of a model")
    p.add_argument("model", help="known model name, .gguf file, or model directory (float weights)")
    p.add_argument("--to", required=True, choices=["int8", "int4"], help="int8 per channel or int4 group-wise")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 only: weights per scale, 32, 64 or 128 (default 64)")
    p.add_argument("--out", required=True, help="output directory (LLM.load and every command read it)")
    p.set_defaults(func=cmd_quantize)
