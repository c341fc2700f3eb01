"""Model compression on SmolLM2-135M, perplexity on held-out text (issue 15, item 5).

    python benchmarks/compress.py --part gptq [--samples 128 --seq-len 512 --eval-tokens 8192]
        [--settings int4-64,int4-channel,int3-64,int4-32] [--act-order [on|both]] [--passes one-pass|both]
    python benchmarks/compress.py --part qat [--steps 100 --batch-size 4 --train-len 256 --lr 1e-4]

Text: the bundled Shakespeare corpus; its first 90% calibrates (GPTQ) and trains (QAT), the last 10% is held
out for perplexity (non-overlapping windows of --context tokens). The quantized models are the real int4 layers
(``LLM.load`` of what ``scratchlm quantize`` writes computes the same), so bfloat16 activations included.

- gptq: round to nearest (RTN, ``quantize_model``) against GPTQ (``gptq_quantize_model``) at int4 group 64
  (SmolLM2's 576 inputs are not a multiple of 128, so group 128 cannot hold its layers: 64 is the largest group
  that does), int4 per channel, int3 group 64 and int4 group 32; the figure is each one's perplexity increase
  over float32, and the share of RTN's increase that GPTQ removes.
- qat: the same short full fine-tune twice from the float model, once plain and once quantization-aware (int4
  per channel); then post-training RTN of the plain one against the QAT one quantized, both measured against
  the plain fine-tuned model in float32.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

# As the scratchlm command does (cpu.set_wait_policy), before torch loads: OpenMP threads that spin 300,000 times
# while waiting collapse on a shared machine (a first run without it took 10 minutes for RTN's quantize_model).
if not any(name in os.environ for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
    os.environ["GOMP_SPINCOUNT"] = "1000"

import torch  # noqa: E402
import torch.nn.functional as F
from common import append_results, machine

CORPUS = Path(__file__).resolve().parent.parent / "src" / "scratchlm" / "data" / "shakespeare.txt"


def split_corpus(tmp: Path) -> tuple[Path, str]:
    """(file holding the first 90% of the corpus, the held-out last 10% as text)."""
    text = CORPUS.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    cut = text.index("\n", cut) + 1
    train = tmp / "compress_train.txt"
    train.write_text(text[:cut], encoding="utf-8")
    return train, text[cut:]


def held_out_ppl(model, ids: torch.Tensor, context: int) -> float:
    from scratchlm.eval.perplexity import perplexity

    return perplexity(model, ids, context=context, stride=context).perplexity


def gptq_variants(args) -> list[tuple[bool, bool]]:
    """(act_order, sequential) pairs to run for each setting, from --act-order and --passes."""
    orders = {"off": [False], "on": [True], "both": [False, True]}[args.act_order]
    passes = {"sequential": [True], "one-pass": [False], "both": [True, False]}[args.passes]
    return [(a, q) for q in passes for a in orders]


def variant_name(act_order: bool, sequential: bool) -> str:
    return f"{'act-order' if act_order else 'columns in order'}, {'sequential' if sequential else 'one pass'}"


def part_gptq(args, llm, train_path: Path, eval_ids: torch.Tensor) -> str:
    from scratchlm.quant import quantize_model
    from scratchlm.quant.calibration import calibration_tokens
    from scratchlm.quant.gptq import gptq_quantize_model

    tokens = calibration_tokens(llm.tokenizer, train_path, args.samples, args.seq_len)
    base = llm.model
    start = time.perf_counter()
    ppl_float = held_out_ppl(base, eval_ids, args.context)
    print(f"float32: perplexity {ppl_float:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    configs = [(int(bits), group if group == "channel" else int(group))
               for bits, group in (s.removeprefix("int").split("-") for s in args.settings.split(","))]
    rows = []
    for bits, group in configs:
        model = copy.deepcopy(base)
        quantize_model(model, "int4", group, bits=bits)
        ppl_rtn = held_out_ppl(model, eval_ids, args.context)
        del model
        print(f"int{bits} group {group} rtn: perplexity {ppl_rtn:.3f}", flush=True)
        rtn_up = ppl_rtn - ppl_float
        for act_order, sequential in gptq_variants(args):
            model = copy.deepcopy(base)
            start = time.perf_counter()
            gptq_quantize_model(model, tokens, group, bits, act_order=act_order, sequential=sequential,
                                progress=True)
            took = time.perf_counter() - start
            ppl = held_out_ppl(model, eval_ids, args.context)
            del model
            up = ppl - ppl_float
            removed = 1 - up / rtn_up if rtn_up > 0 else float("nan")
            row = (f"| int{bits} group {group} | {variant_name(act_order, sequential)} | "
                   f"{ppl_rtn:.3f} (+{100 * rtn_up / ppl_float:.2f}%) | {ppl:.3f} (+{100 * up / ppl_float:.2f}%) | "
                   f"{'n/a (RTN adds nothing)' if math.isnan(removed) else f'{100 * removed:.0f}%'} | {took:.0f} s |")
            print(row, flush=True)  # each row as it comes: a stopped run still leaves its finished rows
            rows.append(row)
    head = (f"float32 perplexity {ppl_float:.3f}; GPTQ on {args.samples} x {args.seq_len} calibration tokens, "
            "damping 0.01\n\n"
            "| setting | GPTQ variant | RTN perplexity (increase) | GPTQ perplexity (increase) "
            "| RTN increase GPTQ removes | GPTQ time |\n|---|---|---|---|---|---|\n")
    return head + "\n".join(rows) + "\n"


def train_steps(model, train_ids: torch.Tensor, args, seed: int = 0) -> float:
    """``args.steps`` AdamW steps on random windows of ``train_ids`` (the same windows for every call)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(args.steps):
        starts = torch.randint(0, len(train_ids) - args.train_len - 1, (args.batch_size,), generator=generator)
        batch = torch.stack([train_ids[s : s + args.train_len + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  step {step + 1}/{args.steps}: loss {loss.item():.4f}", flush=True)
    model.eval()
    return loss.item()


def part_qat(args, llm, train_path: Path, eval_ids: torch.Tensor) -> str:
    from scratchlm.quant import quantize_model
    from scratchlm.quant.qat import prepare_qat

    train_ids = torch.tensor(llm.tokenizer.encode(train_path.read_text(encoding="utf-8")), dtype=torch.long)
    group = args.qat_group
    base = llm.model
    base.requires_grad_(True)
    plain = copy.deepcopy(base)
    start = time.perf_counter()
    print("plain fine-tune", flush=True)
    train_steps(plain, train_ids, args)
    print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    ppl_float = held_out_ppl(plain, eval_ids, args.context)
    rtn = copy.deepcopy(plain)
    quantize_model(rtn, "int4", group)
    ppl_rtn = held_out_ppl(rtn, eval_ids, args.context)
    del rtn
    print(f"plain: float32 {ppl_float:.3f}, RTN int4 group {group} {ppl_rtn:.3f}", flush=True)

    qat = copy.deepcopy(base)
    prepare_qat(qat, "int4", group)
    start = time.perf_counter()
    print("quantization-aware fine-tune", flush=True)
    train_steps(qat, train_ids, args)
    print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    converted = copy.deepcopy(base)  # a plain float model holding the trained (latent) weights
    converted.load_state_dict(qat.state_dict())
    quantize_model(converted, "int4", group)
    ppl_qat = held_out_ppl(converted, eval_ids, args.context)
    closer = 1 - (ppl_qat - ppl_float) / (ppl_rtn - ppl_float) if ppl_rtn > ppl_float else float("nan")
    print(f"QAT int4 group {group}: {ppl_qat:.3f}; {100 * closer:.0f}% closer to float32 than RTN", flush=True)
    return (f"full fine-tune, {args.steps} steps of {args.batch_size} x {args.train_len} tokens, "
            f"AdamW lr {args.lr:g}\n\n"
            "| model | held-out perplexity | increase over float32 |\n|---|---|---|\n"
            f"| fine-tuned, float32 | {ppl_float:.3f} | |\n"
            f"| fine-tuned, then RTN int4 group {group} | {ppl_rtn:.3f} | +{100 * (ppl_rtn / ppl_float - 1):.2f}% |\n"
            f"| QAT fine-tuned, int4 group {group} | {ppl_qat:.3f} | +{100 * (ppl_qat / ppl_float - 1):.2f}% |\n\n"
            f"QAT is {100 * closer:.0f}% closer to float32 than post-training RTN (target: at least 30%).\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["gptq", "qat"], required=True)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored")
    p.add_argument("--context", type=int, default=512, help="tokens per perplexity window")
    p.add_argument("--samples", type=int, default=128, help="gptq: calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="gptq: tokens per calibration window")
    p.add_argument("--settings", default="int4-64,int4-channel,int3-64,int4-32",
                   help="gptq: comma-separated intBITS-GROUP settings to compare")
    p.add_argument("--act-order", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                   help="gptq: quantize columns by decreasing input energy (on), or run both orders (both)")
    p.add_argument("--passes", default="sequential", choices=["sequential", "one-pass", "both"],
                   help="gptq: Hessians layer after layer within a block (sequential, the default of "
                        "gptq_quantize_model) or all from one pass of the float block (one-pass), or both")
    p.add_argument("--steps", type=int, default=100, help="qat: optimizer steps of each fine-tune")
    p.add_argument("--batch-size", type=int, default=4, help="qat: windows per step")
    p.add_argument("--train-len", type=int, default=256, help="qat: tokens per training window")
    p.add_argument("--lr", type=float, default=1e-4, help="qat: AdamW learning rate")
    p.add_argument("--qat-group", default="channel", help="qat: int4 group (channel, 32, 64 or 128)")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--note", default="", help="a sentence added to the RESULTS.md section (e.g. the machine's load)")
    args = p.parse_args()
    if args.qat_group != "channel":
        args.qat_group = int(args.qat_group)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import tempfile

    from scratchlm.llm import LLM

    llm = LLM.load(args.model, dequantize=True, compile=False)
    with tempfile.TemporaryDirectory() as tmp:
        train_path, held_out = split_corpus(Path(tmp))
        eval_ids = torch.tensor(llm.tokenizer.encode(held_out)[: args.eval_tokens + 1], dtype=torch.long)
        start = time.perf_counter()
        table = (part_gptq if args.part == "gptq" else part_qat)(args, llm, train_path, eval_ids)
    took = time.perf_counter() - start
    load = os.getloadavg()[0]
    command = "python benchmarks/compress.py " + " ".join(
        a for a in __import__("sys").argv[1:] if a != "--no-append")
    section = (f"\n## Compression: {args.part} ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)\n\n"
               f"Machine: {machine()}, torch {torch.__version__}, {args.threads} threads, load average {load:.1f} at "
               f"the end ({took / 60:.0f} min). Command: `{command}`. {args.model}, held-out perplexity on "
               f"{len(eval_ids) - 1} tokens (last 10% of the bundled Shakespeare, windows of {args.context})."
               + (f" {args.note}" if args.note else "") + "\n\n" + table)
    print(section)
    if not args.no_append:
        append_results(section)


if __name__ == "__main__":
    main()
