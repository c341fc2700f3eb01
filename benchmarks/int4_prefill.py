"""int4 prefill: PyTorch's int4 kernel against dequantize-then-multiply (``quant.int4_pack``), and the 512-token
prefill of the int4 engine against HF transformers in bfloat16, in one process.

    .venv/bin/python benchmarks/int4_prefill.py             # crossover table, then the prefill race
    .venv/bin/python benchmarks/int4_prefill.py --record    # ... appended to benchmarks/RESULTS.md

1. Per layer: SmolLM2's four int4 products (q/k/v fused 960 x 576, o 576 x 576, gate/up fused 3,072 x 576, down
   576 x 1,536) at 1-512 rows, best of many repeats: the kernel, and dequantizing into bfloat16 then ``torch.mm``.
   The row count where the second wins sets ``quant.int4.PREFILL_MIN_ROWS``.
2. Prefill of 512 tokens (time to the first token) on the pulled SmolLM2 GGUF: scratchlm int4 computing in
   bfloat16 (as decode.py's scratchlm-int4), once through the kernel only and once with the prefill path, and
   HF transformers bfloat16; rounds alternate between engines, medians reported, 2 threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import append_results, section_header

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
ROWS = (1, 8, 16, 32, 64, 96, 128, 256, 512)


def best_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def crossover(repeats: int) -> list[str]:
    import torch

    from scratchlm.quant.int4 import pack_for_kernel, quantize_int4
    from scratchlm.quant.int4_pack import dequantize_packed_t

    gen = torch.Generator().manual_seed(0)
    layers = [pack_for_kernel(*quantize_int4(torch.randn(n, k, generator=gen) * 0.02, 32, refine_steps=0))
              for n, k in SHAPES]
    lines = ["| rows | int4 kernel ms | dequantize + mm ms | kernel / dequantize+mm |", "|---|---|---|---|"]
    for rows in ROWS:
        kernel = dense = 0.0
        for (packed, sz), (_, k) in zip(layers, SHAPES):
            x = torch.randn(rows, k, generator=gen).bfloat16()
            kernel += best_ms(lambda x=x, p=packed, sz=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, 32, sz),
                              repeats)
            dense += best_ms(lambda x=x, p=packed, sz=sz: torch.mm(x, dequantize_packed_t(p, sz, 32)), repeats)
        lines.append(f"| {rows} | {kernel:.3f} | {dense:.3f} | {kernel / dense:.2f}x |")
    return lines


def prefill_race(model: str, rounds: int) -> list[str]:
    import torch
    import transformers

    from scratchlm.hub import resolve
    from scratchlm.llm import LLM
    from scratchlm.quant import int4

    path = resolve(model)
    ours = LLM.load(path, dtype="bfloat16", quantize="int4")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.bfloat16).eval()
    text = open(os.path.join(os.path.dirname(__file__), "..", "src", "scratchlm", "data", "shakespeare.txt"),
                encoding="utf-8").read()[:20000]
    ids = ours.tokenizer.encode(text)[:512]
    on = int4.PREFILL_MIN_ROWS

    def scratchlm_prefill(min_rows: int) -> float:
        int4.PREFILL_MIN_ROWS = min_rows
        t = time.perf_counter()
        ours.generate(ids, max_new_tokens=1, temperature=0)  # like HF's generate below: prefill, one token
        return len(ids) / (time.perf_counter() - t)

    def hf_prefill() -> float:
        t = time.perf_counter()
        hf.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False, pad_token_id=0)
        return len(ids) / (time.perf_counter() - t)

    engines = {"scratchlm int4, kernel only": lambda: scratchlm_prefill(10**9),
               "scratchlm int4, prefill path": lambda: scratchlm_prefill(on),
               "HF transformers bfloat16": hf_prefill}
    speeds: dict[str, list[float]] = {name: [] for name in engines}
    with torch.inference_mode():
        for run in engines.values():
            run()  # warm-up
        for _ in range(rounds):
            for name, run in engines.items():
                speeds[name].append(run())
    int4.PREFILL_MIN_ROWS = on
    hf_median = statistics.median(speeds["HF transformers bfloat16"])
    lines = ["| engine | prefill 512 tok/s (median / best) | vs HF bfloat16 |", "|---|---|---|"]
    for name, values in speeds.items():
        lines.append(f"| {name} | {statistics.median(values):.0f} / {max(values):.0f} | "
                     f"{statistics.median(values) / hf_median:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30, help="per layer and row count (best taken)")
    parser.add_argument("--rounds", type=int, default=5, help="prefill rounds per engine (median taken)")
    parser.add_argument("--no-race", action="store_true", help="the per-layer table only")
    parser.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    lines = ["Per layer, SmolLM2's four int4 products summed (group 32):", "", *crossover(args.repeats)]
    if not args.no_race:
        lines += ["", "Prefill of 512 tokens:", "", *prefill_race(args.model, args.rounds)]
    lines.append(f"\nload average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    table = "\n".join(lines)
    print(table)
    if args.record:
        append_results(section_header(f"{args.threads} threads") + table + "\n")


if __name__ == "__main__":
    main()
