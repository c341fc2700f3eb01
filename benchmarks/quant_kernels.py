"""The matrix kernels behind scratchlm.quant, over SmolLM2-135M's weight shapes (one token's worth of products).

    .venv/bin/python benchmarks/quant_kernels.py                 # 1 token (decode), 1 thread
    .venv/bin/python benchmarks/quant_kernels.py --rows 512      # a 512-token prompt (prefill)
    .venv/bin/python benchmarks/quant_kernels.py --threads 2

Each variant runs the 211 products of one SmolLM2 step (30 layers x q, k, v, o, gate, up, down, plus the LM
head) on random weights. Variants are interleaved repeat by repeat, so that a load spike hits them all alike,
and each is reported as its median time and as the median of its per-repeat ratio to float32. This is how
the int8 and int4 paths of scratchlm.quant were chosen (see the comments in quant/int8.py and quant/int4.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30 + [(49152, 576)]


def variants(rows: int) -> dict:
    from scratchlm.quant.int4 import pack_for_kernel, quantize_int4
    from scratchlm.quant.int8 import quantize_int8

    torch.manual_seed(0)
    weights = [torch.randn(n, k) * 0.02 for n, k in SHAPES]
    x32 = {k: torch.randn(rows, k) for k in (576, 1536)}
    xbf = {k: v.bfloat16() for k, v in x32.items()}
    wbf = [w.bfloat16() for w in weights]
    q8 = [quantize_int8(w) for w in weights]
    q8bf = [(q, s.bfloat16()) for q, s in q8]
    q4 = {g: [pack_for_kernel(*quantize_int4(w, g, refine_steps=0)) for w in weights] for g in (32, 64)}
    int8mm, int4mm = torch.ops.aten._weight_int8pack_mm, torch.ops.aten._weight_int4pack_mm_for_cpu
    out = {
        "float32 dense": lambda: [F.linear(x32[w.shape[1]], w) for w in weights],
        "bfloat16 dense": lambda: [F.linear(xbf[w.shape[1]], w) for w in wbf],
        "int8pack, bf16 activations": lambda: [int8mm(xbf[q.shape[1]], q, s) for q, s in q8bf],
        "int8 -> bf16, dense product": lambda: [F.linear(xbf[q.shape[1]], q.bfloat16()) * s for q, s in q8bf],
    }
    for g, packed in q4.items():
        out[f"int4pack g{g}, bf16 activations"] = (
            lambda packed=packed, g=g: [int4mm(xbf[w.shape[1]], p, g, sz) for w, (p, sz) in zip(weights, packed)])
    if rows == 1:  # the float32 paths of the quantized kernels: far too slow for 512 rows
        out["int8pack, f32 activations"] = lambda: [int8mm(x32[q.shape[1]], q, s) for q, s in q8]
        q4f = [(p, sz.float()) for p, sz in q4[64]]
        out["int4pack g64, f32 activations"] = (
            lambda: [int4mm(x32[w.shape[1]], p, 64, sz) for w, (p, sz) in zip(weights, q4f)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1, help="activation rows: 1 = decode, 512 = prefill")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fns = variants(args.rows)
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = times["float32 dense"]
    print(f"rows {args.rows}, threads {args.threads}, {args.repeats} repeats; 211 products per run\n")
    print("| variant | median ms | best ms | time / float32 (median of ratios) |\n|---|---|---|---|")
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {min(ts) * 1e3:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
