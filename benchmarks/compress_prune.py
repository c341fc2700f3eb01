"""Pruning and distillation on SmolLM2-135M (issue 15, item 5): three parts, each a few minutes on 2 cores.

    python benchmarks/compress_prune.py --part sparsity   # perplexity vs sparsity 0.1..0.7, magnitude vs Wanda, PNG
    python benchmarks/compress_prune.py --part minitron   # structured prune to ~2/3, distil; vs the shape from scratch
    python benchmarks/compress_prune.py --part depth      # 1/4 of the layers: with the teacher vs without, same steps

Text: the bundled Shakespeare. Calibration windows come from its first 90% (what ``scratchlm train`` and
``scratchlm distill`` use for training), perplexity and validation loss from its last 10% (held out). Every
run here goes through the same functions as the commands (``compress.pipeline.prune_llm``,
``compress.distill.run_distill``); ``--alpha 0`` is the same training run without the teacher.
``--record`` appends the tables to RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import append_results, machine

MODEL = "smollm2-135m-instruct"


def corpus() -> tuple[str, str]:
    """The bundled corpus split 90/10 by characters: (calibration/training text, held-out text)."""
    from scratchlm.train.sources import bundled_corpus

    text = bundled_corpus().read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    return text[:cut], text[cut:]


def load_note() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


# ---- part 1: perplexity against sparsity ---------------------------------------------------------------
def part_sparsity(args) -> str:
    from scratchlm.compress.pipeline import prune_llm
    from scratchlm.eval.perplexity import perplexity
    from scratchlm.llm import LLM

    train_text, held_out = corpus()
    work = Path(args.work)  # a temporary directory, deleted at the end (models of ~0.5 GB each)
    calibration = work / "calibration.txt"
    calibration.write_text(train_text, encoding="utf-8")
    base = LLM.load(MODEL, dtype="float32", compile=False)
    ids = base.tokenizer.encode(held_out)[: args.eval_tokens]
    state = copy.deepcopy(base.model.state_dict())

    def ppl(model) -> float:
        return perplexity(model, ids, context=args.seq_len, stride=args.seq_len).perplexity

    dense = ppl(base.model)
    print(f"dense float32: perplexity {dense:.2f} on {len(ids)} held-out tokens")
    rows = []
    for sparsity in args.sparsities:
        row = {"sparsity": sparsity}
        for method in ("magnitude", "wanda"):
            base.model.load_state_dict(state)
            start = time.perf_counter()
            prune_llm(base, method, sparsity, calibration=calibration, samples=args.samples, seq_len=args.seq_len)
            row[f"{method}_s"] = time.perf_counter() - start
            row[method] = ppl(base.model)
        rows.append(row)
        print(f"sparsity {sparsity:.1f}: magnitude {row['magnitude']:.2f}, wanda {row['wanda']:.2f} "
              f"(pruning {row['magnitude_s']:.1f} s / {row['wanda_s']:.1f} s)")
    png = Path(args.plot)
    plot(rows, dense, png)
    table = ["| sparsity | magnitude ppl | Wanda ppl | Wanda / magnitude |", "|---|---|---|---|"]
    table += [f"| {r['sparsity']:.1f} | {r['magnitude']:.2f} | {r['wanda']:.2f} | {r['wanda'] / r['magnitude']:.2f} |"
              for r in rows]
    half = next((r for r in rows if abs(r["sparsity"] - 0.5) < 1e-9), None)
    verdict = "" if half is None else (
        f"\n\nAt 50%: Wanda {half['wanda']:.2f} against magnitude {half['magnitude']:.2f} "
        f"({'met' if half['wanda'] < half['magnitude'] else 'NOT met'}: target Wanda below magnitude).")
    return (f"Dense float32 perplexity {dense:.2f}; {len(ids)} held-out tokens in windows of {args.seq_len}; Wanda "
            f"calibration {args.samples} x {args.seq_len} tokens. Plot: `{png}`.\n\n" + "\n".join(table) + verdict)


def plot(rows: list[dict], dense: float, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["sparsity"] for r in rows]
    for method, label in (("magnitude", "magnitude |W|"), ("wanda", "Wanda |W|·‖X‖")):
        ax.plot(xs, [r[method] for r in rows], marker="o", label=label)
    ax.axhline(dense, color="gray", linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (fraction of each row's weights zeroed)")
    ax.set_ylabel("perplexity (held-out Shakespeare, log scale)")
    ax.set_title("SmolLM2-135M: unstructured pruning")
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"wrote {png}")


# ---- part 2: Minitron, structured prune then distil -------------------------------------------------------
def train_run(teacher: str, student: str, data: Path, out: Path, args, alpha: float) -> float:
    from scratchlm.compress.distill import DistillOptions, run_distill

    result = run_distill(DistillOptions(
        teacher=teacher, student=student, data=data, out=out, alpha=alpha, temperature=args.temperature,
        max_steps=args.steps, batch_size=args.batch_size, context_length=args.seq_len, lr=args.lr,
        eval_interval=args.steps, eval_batches=args.eval_batches, seed=0, force=True, progress=False),
        say=lambda *a: None)
    return result.best_val_loss


def val_text(args) -> str:
    return f"held-out 10%, {args.eval_batches} x {args.batch_size} x {args.seq_len} tokens"


def lr_text(args) -> str:
    return f"{args.lr:g}" if args.lr else "3e-4 for a loaded student, 1e-3 from scratch (distill's defaults)"


def decode_rate(path: str, tokens: int = 48, repeats: int = 3) -> float:
    """int4 decode tokens/s of a model: (tokens - 1) / (time after the first token), median of ``repeats``."""
    from scratchlm.llm import LLM

    llm = LLM.load(path, quantize="int4", compile=False)
    prompt = "To be, or not to be, that is the question:"
    rates = []
    llm.generate(prompt, max_new_tokens=8, temperature=0, ignore_eos=True)  # warm-up
    for _ in range(repeats):
        first = None
        n = 0
        for _ in llm.stream(prompt, max_new_tokens=tokens, temperature=0, ignore_eos=True):
            n += 1
            if first is None:
                first = time.perf_counter()
        rates.append((n - 1) / (time.perf_counter() - first))
    return statistics.median(rates)


def part_minitron(args) -> str:
    from scratchlm.compress.pipeline import prune_to_directory
    from scratchlm.formats.checkpoint import save_model_dir
    from scratchlm.llm import LLM

    train_text, held_out = corpus()
    work = Path(args.work)  # a temporary directory, deleted at the end (models of ~0.5 GB each)
    data = work / "shakespeare.txt"
    data.write_text(train_text + held_out, encoding="utf-8")  # distill's 10% validation split is the held-out part
    calibration = work / "calibration.txt"
    calibration.write_text(train_text, encoding="utf-8")
    start = time.perf_counter()
    pruned = prune_to_directory(MODEL, work / "pruned", "structured", heads=args.heads, mlp=args.mlp,
                                calibration=calibration, samples=args.samples, seq_len=args.seq_len)
    prune_s = time.perf_counter() - start
    share = pruned.params_after / pruned.params_before
    print(f"pruned to {pruned.params_after / 1e6:.1f}M of {pruned.params_before / 1e6:.1f}M parameters ({share:.1%}) "
          f"in {prune_s:.0f} s")
    scratch_config = work / "scratch_config.json"
    cfg = pruned.llm.config.to_dict()
    cfg.pop("vocab_size")
    import json

    scratch_config.write_text(json.dumps(cfg))
    teacher_loss = _val_loss(MODEL, data, args)
    pruned_loss = _val_loss(str(work / "pruned"), data, args)
    print(f"teacher val loss {teacher_loss:.3f}; pruned, before distillation {pruned_loss:.3f}")
    timings = {}
    losses = {}
    for name, student, alpha in (("pruned + distilled", str(work / "pruned"), args.alpha),
                                 ("same shape from scratch", str(scratch_config), 0.0)):
        start = time.perf_counter()
        losses[name] = train_run(MODEL, student, data, work / name.replace(" ", "_"), args, alpha)
        timings[name] = time.perf_counter() - start
        print(f"{name}: val loss {losses[name]:.3f} after {args.steps} steps ({timings[name]:.0f} s)")
    distilled_dir = work / "pruned_+_distilled" / "best"
    teacher_dir = work / "teacher"
    teacher = LLM.load(MODEL, dtype="float32", compile=False)
    save_model_dir(teacher_dir, teacher.config, teacher.model.canonical_state_dict(), teacher.tokenizer,
                   teacher.template.source)
    del teacher
    rate_teacher = decode_rate(str(teacher_dir))
    rate_student = decode_rate(str(distilled_dir))
    print(f"int4 decode: teacher {rate_teacher:.1f} tok/s, student {rate_student:.1f} tok/s "
          f"({rate_student / rate_teacher:.2f}x)")
    tokens = args.steps * args.batch_size * args.seq_len
    c = pruned.llm.config
    met = losses["pruned + distilled"] < losses["same shape from scratch"]
    return (f"Structured pruning `--heads {args.heads:.3g} --mlp {args.mlp:.3g}` (calibration {args.samples} x "
            f"{args.seq_len} tokens, {prune_s:.0f} s): {c.n_heads} heads in {c.n_kv_heads} key/value groups, "
            f"d_ff {c.d_ff}; "
            f"{pruned.params_after / 1e6:.1f}M of {pruned.params_before / 1e6:.1f}M parameters ({share:.1%}). "
            f"Budget: {args.steps} steps x {args.batch_size} x {args.seq_len} = {tokens:,} tokens, lr {lr_text(args)}, "
            f"distillation T={args.temperature:g}, alpha={args.alpha:g}.\n\n"
            f"| model | validation loss ({val_text(args)}) | training time |\n|---|---|---|\n"
            f"| teacher (unpruned) | {teacher_loss:.3f} | |\n"
            f"| pruned, not trained | {pruned_loss:.3f} | |\n"
            + "".join(f"| {name} | {loss:.3f} | {timings[name]:.0f} s |\n" for name, loss in losses.items())
            + f"\nPruned + distilled below the same architecture from scratch: {'met' if met else 'NOT met'}.\n\n"
            f"int4 (group 32) decode, 48 tokens, median of 3: unpruned {rate_teacher:.1f} tok/s, pruned + distilled "
            f"{rate_student:.1f} tok/s ({rate_student / rate_teacher:.2f}x).")


def _eval_batches(data: Path, tokenizer, args):
    from scratchlm.train.data import eval_batches, prepare_dataset

    prepared = prepare_dataset(data, tokenizer, data.parent / "eval_data", 0.1, progress=False)
    return eval_batches(prepared.val(), args.batch_size, args.seq_len, args.eval_batches)


def _val_loss(path: str, data: Path, args) -> float:
    from scratchlm.llm import LLM
    from scratchlm.train.distributed import Dist
    from scratchlm.train.loop import TrainConfig, evaluate

    llm = LLM.load(path, dequantize=True, compile=False)
    return evaluate(llm.model, _eval_batches(data, llm.tokenizer, args), TrainConfig(), Dist())


# ---- part 3: distillation alone, 1/4 of the layers ---------------------------------------------------------
def part_depth(args) -> str:
    from scratchlm.formats.checkpoint import save_model_dir
    from scratchlm.llm import LLM

    train_text, held_out = corpus()
    work = Path(args.work)  # a temporary directory, deleted at the end (models of ~0.5 GB each)
    data = work / "shakespeare.txt"
    data.write_text(train_text + held_out, encoding="utf-8")
    teacher = LLM.load(MODEL, dtype="float32", compile=False)
    n = teacher.config.n_layers
    keep = list(range(0, n, 4))  # every fourth layer: 8 of SmolLM2's 30
    state = teacher.model.canonical_state_dict()
    small = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    for new, old in enumerate(keep):
        for k, v in state.items():
            if k.startswith(f"blocks.{old}."):
                small[f"blocks.{new}." + k.split(".", 2)[2]] = v
    config = teacher.config.replace(n_layers=len(keep))
    save_model_dir(work / "student", config, small, teacher.tokenizer, teacher.template.source)
    del teacher, state, small
    start_loss = _val_loss(str(work / "student"), data, args)
    print(f"student: layers {keep} of {n}; validation loss before training {start_loss:.3f}")
    losses, timings = {}, {}
    for name, alpha in (("with the teacher", args.alpha), ("without the teacher", 0.0)):
        start = time.perf_counter()
        losses[name] = train_run(MODEL, str(work / "student"), data, work / name.replace(" ", "_"), args, alpha)
        timings[name] = time.perf_counter() - start
        print(f"{name}: val loss {losses[name]:.3f} after {args.steps} steps ({timings[name]:.0f} s)")
    met = losses["with the teacher"] < losses["without the teacher"]
    tokens = args.steps * args.batch_size * args.seq_len
    return (f"Student: {len(keep)} of the teacher's {n} layers (every fourth, {keep}), the embeddings and final norm, "
            f"both runs from these same weights. Budget: {args.steps} steps x {args.batch_size} x {args.seq_len} = "
            f"{tokens:,} tokens, lr {args.lr or 3e-4:g} in both runs; with the teacher T={args.temperature:g}, "
            f"alpha={args.alpha:g}.\n\n"
            f"| student | validation loss ({val_text(args)}) | training time |\n|---|---|---|\n"
            f"| before training | {start_loss:.3f} | |\n"
            + "".join(f"| {name} | {loss:.3f} | {timings[name]:.0f} s |\n" for name, loss in losses.items())
            + f"\nWith the teacher below without it: {'met' if met else 'NOT met'}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", required=True, choices=["sparsity", "minitron", "depth"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (calibration, eval, training)")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for perplexity")
    parser.add_argument("--plot", default="benchmarks/results/prune_sparsity.png")
    parser.add_argument("--eval-batches", type=int, default=20, help="validation batches (spread over the 10%%)")
    parser.add_argument("--heads", type=float, default=1 / 3)
    parser.add_argument("--mlp", type=float, default=0.45)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None,
                        help="default: distill's own (3e-4 for a loaded student, 1e-3 for one from scratch)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append the result to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compress-prune-") as work:
        args.work = work
        body = {"sparsity": part_sparsity, "minitron": part_minitron, "depth": part_depth}[args.part](args)
    elapsed = time.perf_counter() - start
    titles = {"sparsity": "Pruning SmolLM2-135M: perplexity against sparsity, magnitude and Wanda",
              "minitron": "Minitron on SmolLM2-135M: structured pruning to ~2/3, then distillation",
              "depth": "Distillation alone: a SmolLM2-135M student with 1/4 of the layers"}
    section = (f"\n## {titles[args.part]} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
               f"Machine: {machine()}; {load_note()} after the run ({elapsed / 60:.1f} min). torch "
               f"{torch.__version__}, {args.threads} threads, float32.\nCommand: `python benchmarks/compress_prune.py "
               f"{' '.join(os.sys.argv[1:]).replace(' --record', '')}`\n\n{body}\n")
    print(section)
    if args.record:
        append_results(section)


if __name__ == "__main__":
    main()
