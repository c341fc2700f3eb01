"""``scratchlm quantize MODEL --to int8|int4 [--group-size G] --out DIR [--force]``: write a quantized checkpoint.

    scratchlm quantize MODEL --to int4 --group-size 32 --out DIR                    # round to nearest (default)
    scratchlm quantize MODEL --to int4 --method gptq --calibration corpus.txt \
        [--samples 128 --seq-len 512] [--group-size 32|64|128|channel] [--bits 4|3] [--act-order] --out DIR

The directory is written under a temporary name beside ``--out`` and renamed into place when complete; an
existing ``--out`` is replaced only with ``--force`` (and only when it holds a model).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from scratchlm.cli_options import (
    add_force_flag,
    add_group_size_flag,
    add_progress_flag,
    add_threads_flag,
    show_progress,
)
from scratchlm.errors import ConfigError

METHODS = ("rtn", "gptq")


def quantize_to_directory(model: str, mode: str, out, group_size: int | str | None = None, force: bool = False,
                          progress: bool = False, method: str = "rtn", calibration: str | Path | None = None,
                          samples: int | None = None, seq_len: int | None = None, bits: int = 4,
                          act_order: bool = False, damp: float | None = None):
    """Load ``model`` in float32, quantize it (a progress bar per layer) and write it to ``out``; returns the LLM.

    ``method="gptq"`` (int4 only) fits the layers to ``samples`` windows of ``seq_len`` tokens of the text file
    ``calibration`` (``quant.gptq``); ``bits=3`` stores 3-bit codes in the int4 format.
    """
    from scratchlm.files import atomic_dir, check_destination
    from scratchlm.llm import LLM
    from scratchlm.progress import stage
    from scratchlm.quant import quantize_model, save_quantized
    from scratchlm.quant.calibration import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, calibration_tokens
    from scratchlm.quant.gptq import DEFAULT_DAMP, gptq_quantize_model
    from scratchlm.quant.quantize import check_options

    group_size = check_options(mode, group_size, bits)  # fail before the (slow) load
    if method not in METHODS:
        raise ConfigError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    gptq_only = {"--calibration": calibration, "--samples": samples, "--seq-len": seq_len,
                 "--act-order": act_order or None, "--damp": damp}
    if method == "rtn" and any(v is not None for v in gptq_only.values()):
        given = ", ".join(k for k, v in gptq_only.items() if v is not None)
        raise ConfigError(f"{given} apply to --method gptq only")
    if method == "gptq":
        if mode != "int4":
            raise ConfigError("GPTQ quantizes to int4 (4 or 3 bits): use --to int4")
        if calibration is None:
            raise ConfigError("GPTQ needs calibration text: give --calibration FILE (plain text, e.g. a corpus of "
                              "the kind of text the model will see)")
        if not Path(calibration).is_file():
            raise ConfigError(f"calibration file not found: {calibration}")
        if damp is not None and not 0 <= damp < 1:
            raise ConfigError(f"--damp must be in [0, 1), got {damp}")
    check_destination(out, force, want_dir=True)
    # Quantize from float32 so that the stored scales are exact; the dtype to compute in is chosen at load.
    with stage(f"loading {model}", progress):
        llm = LLM.load(model, dequantize=True, compile=False)
    if method == "gptq":
        seq_len = seq_len or min(DEFAULT_SEQ_LEN, llm.config.context_length)
        if seq_len > llm.config.context_length:
            raise ConfigError(f"--seq-len {seq_len} exceeds the model's context of {llm.config.context_length}")
        with stage(f"tokenizing {calibration}", progress):
            tokens = calibration_tokens(llm.tokenizer, calibration, samples or DEFAULT_SAMPLES, seq_len)
        gptq_quantize_model(llm.model, tokens, group_size, bits, bool(act_order),
                            DEFAULT_DAMP if damp is None else damp, progress=progress)
    else:
        quantize_model(llm.model, mode, group_size, progress=progress, bits=bits)
    with stage(f"writing {out}", progress), atomic_dir(out, force) as tmp:
        save_quantized(tmp, llm.model, llm.tokenizer, llm.template.source)
    return llm


def cmd_quantize(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    out = Path(args.out)
    llm = quantize_to_directory(args.model, args.to, out, args.group_size, args.force, show_progress(args),
                                args.method, args.calibration, args.samples, args.seq_len, args.bits,
                                args.act_order, args.damp)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    info = llm.model.quantization
    group = f", group size {info['group_size']}" if args.to == "int4" else ""
    if args.to == "int4":
        group += f", {args.bits}-bit codes" + (" in the int4 container" if args.bits != 4 else "")
        group += f", {info.get('method', 'rtn').upper()}"
    print(f"wrote {out} ({args.to}{group}, {size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s; "
          f"load it with LLM.load({str(out)!r}) or any command, e.g. scratchlm chat {out}")


def register(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="write an int8 or int4 weight-only quantized copy of a model")
    p.add_argument("model", help="known model name, .gguf file, or model directory (float weights)")
    p.add_argument("--to", required=True, choices=["int8", "int4"], help="int8 per channel or int4 group-wise")
    add_group_size_flag(p)
    p.add_argument("--method", choices=METHODS, default="rtn",
                   help="int4: rtn rounds each weight to the nearest level (default, no data needed); gptq "
                        "(Frantar et al. 2022) compensates rounding errors on --calibration text, layer by layer")
    p.add_argument("--bits", type=int, choices=[4, 3], default=4,
                   help="int4 only: 3 stores 3-bit codes (8 levels) in the int4 format (default 4)")
    g = p.add_argument_group("GPTQ")
    g.add_argument("--calibration", default=None, help="plain-text file whose tokens calibrate the layers")
    g.add_argument("--samples", type=int, default=None, help="calibration windows (default 128)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 512)")
    g.add_argument("--act-order", action="store_true", default=None,
                   help="quantize the columns with the largest inputs first (often better at large groups)")
    g.add_argument("--damp", type=float, default=None,
                   help="damping added to the Hessian, a fraction of its mean diagonal (default 0.01)")
    p.add_argument("--out", required=True, help="output directory (LLM.load and every command read it)")
    add_force_flag(p)
    add_threads_flag(p)
    add_progress_flag(p)
    p.set_defaults(func=cmd_quantize)
