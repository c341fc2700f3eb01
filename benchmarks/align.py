"""Alignment on SmolLM2-135M-Instruct: DPO speed and memory against TRL's DPOTrainer, and the DPO demonstration.

    .venv/bin/python benchmarks/align.py                    # DPO tokens/s and peak RSS: scratchlm vs TRL
    .venv/bin/python benchmarks/align.py --demo dpo         # DPO teaches a style SmolLM2 does not have
    .venv/bin/python benchmarks/align.py ... --record       # ... and append the figures to RESULTS.md

**Speed and memory.** Same work for both engines: the same preference pairs (the demonstration set of
``scripts/make_preferences.py``) as conversational records (message lists), rendered with SmolLM2's chat template
by both (TRL gets our tokenizer as an HF fast tokenizer with the same template; the script compares TRL's tokenized
training set with ours, every id of every pair, and refuses to time different work), float32, 2 threads,
LoRA rank 8, alpha 16, dropout 0 on q,k,v,o,gate,up,down, beta 0.1, batch 8 pairs, the same number of optimizer
steps, no evaluation, no checkpoints in between, activation checkpointing on (TRL's default for DPOConfig;
``scratchlm-no-checkpointing`` shows ours without it). Precision: float32 for both unless ``--dtype bfloat16``
(bfloat16 autocast for both: ours ``dtype="bfloat16"``, TRL ``bf16=True``). TRL's DPOConfig defaults to
``bf16=True``, which on CPU runs every matmul under bfloat16 autocast; the script sets it explicitly (before
2026-12-02 it did not: the "TRL" rows recorded before then are bfloat16 matmuls against our float32). The learning rate
follows the same schedule in both, step for step: no warm-up, cosine to a tenth of the peak (TRL's
``cosine_with_min_lr``, as our loop); the loss printed is the mean over the steps for both (TRL's
``training_loss``). Each engine runs in a fresh process (its peak RSS, ``ru_maxrss``, loading included, is its
own). Time = the training with its reference log-probabilities: ours are
computed once before the first step with the adapter off; TRL's DPOTrainer, with a PEFT model and no reference
model, computes them in every step with the adapter off (its default), or once before training with
``precompute_ref_log_probs`` (shown too; that pass runs in DPOTrainer's constructor and is timed there and added:
rows before 2026-12-02 04:50 UTC left it out). Tokens/s = real (unpadded) tokens of every chosen and rejected sequence
trained on / that time, the same count for both (checked). Before 2026-12-02 04:00 UTC the records were plain
strings, which TRL tokenizes raw (no chat template, no system prompt: 3,888 tokens for the 9,840 we train on), while
both engines were credited with our count: TRL's rows of those dates did 2.5x less work than ours. The engines run
in rounds in alternating order; ratios use the medians.

**Demonstration.** DPO with LoRA on the training pairs, then on the held-out pairs (templates and subjects never
seen in training): the preference accuracy (chosen log-ratio above rejected) before and after, and greedy answers
to the held-out prompts, before (the base model) and after (with the adapter), checked by ``follows_style``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import append_results, machine

THREADS = 2
ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_preferences():
    """The generator module ``scripts/make_preferences.py``."""
    spec = importlib.util.spec_from_file_location("make_preferences", ROOT / "scripts" / "make_preferences.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_data(directory: Path, seed: int = 0, n_train: int | None = None,
               conversational: bool = False) -> tuple[Path, Path]:
    """The demonstration pairs as JSONL; ``conversational`` writes TRL's message-list layout (prompt a user
    message, chosen/rejected an assistant turn), which both engines render with the chat template."""
    gen = make_preferences()
    train, test = gen.make(seed)
    if conversational:
        train, test = ([{"prompt": [{"role": "user", "content": r["prompt"]}],
                         "chosen": [{"role": "assistant", "content": r["chosen"]}],
                         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
                       for rows in (train, test))
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("train", train[:n_train] if n_train else train), ("test", test)):
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


# ---- speed and memory ------------------------------------------------------------------------------------------
def worker_scratchlm(data: Path, steps: int, batch_size: int, out: Path, checkpointing: bool, dtype: str) -> dict:
    import torch

    import scratchlm.align.dpo as dpo
    from scratchlm.align.run import AlignOptions

    torch.set_num_threads(THREADS)
    # The timed parts: the reference log-probabilities and the training loop (wall and CPU seconds).
    timed = {"reference": 0.0, "cpu": 0.0}

    def timer(function, key: str | None):
        def timed_function(*args, **kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                timed["cpu"] += time.process_time() - cpu
                if key is not None:
                    timed[key] += time.perf_counter() - start
        return timed_function

    dpo.reference_logps = timer(dpo.reference_logps, "reference")
    dpo.train = timer(dpo.train, None)
    result = dpo.run_dpo(AlignOptions(model=MODEL, data=str(data), out=str(out), max_steps=steps,
                                      batch_size=batch_size, val_fraction=0.0, lr=5e-5, warmup_steps=0, beta=0.1,
                                      rank=8, alpha=16.0, activation_checkpointing=checkpointing, dtype=dtype,
                                      force=True, progress=False), say=lambda *a: None)
    losses = [r["loss"] for r in result.history if "loss" in r]
    return {"seconds": result.elapsed + timed["reference"], "cpu_seconds": timed["cpu"],
            "reference_s": timed["reference"], "loss": sum(losses) / len(losses), "last_loss": result.train_loss,
            "dtype": dtype}


def hf_tokenizer(llm, directory: Path):
    import transformers

    llm.tokenizer.save(directory / "tokenizer.json")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"),
                                                     eos_token=llm.tokenizer.eos_token,
                                                     pad_token=llm.tokenizer.eos_token)
    tokenizer.chat_template = llm.template.source
    return tokenizer


def worker_trl(data: Path, steps: int, batch_size: int, out: Path, precompute: bool, dtype: str) -> dict:
    import datasets
    import peft
    import torch
    import transformers
    import trl

    from scratchlm.hub import model_path

    torch.set_num_threads(THREADS)
    gguf = model_path(MODEL)
    # Our tokenizer and chat template as an HF fast tokenizer, written by the parent process (loading our model
    # here for them would count in this process's peak RSS).
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(data.parent / "hf-tokenizer")
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                              dtype=torch.float32)
    # The GGUF file is dequantized to float32 at load; only transformers' bookkeeping still calls the model
    # quantized, and Trainer refuses to train a "GGUF-quantized" model. Drop that label.
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"])
    args = trl.DPOConfig(output_dir=str(out / "trl"), beta=0.1, learning_rate=5e-5, max_steps=steps,
                         per_device_train_batch_size=batch_size, report_to=[], use_cpu=True, save_strategy="no",
                         logging_steps=steps, max_length=1024, precompute_ref_log_probs=precompute,
                         dataloader_num_workers=0, warmup_steps=0, lr_scheduler_type="cosine_with_min_lr",
                         lr_scheduler_kwargs={"min_lr_rate": 0.1}, weight_decay=0.0, disable_tqdm=True,
                         gradient_checkpointing=True,  # TRL's default, written out
                         bf16=dtype == "bfloat16")  # TRL's default is bf16=True: bfloat16 autocast even on CPU
    # With precompute_ref_log_probs the reference pass runs inside DPOTrainer's constructor, before train(): time it
    # there and count it, as ours is counted.
    reference = {"seconds": 0.0, "cpu": 0.0}
    precompute_pass = trl.DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return precompute_pass(self, *args, **kwargs)
        finally:
            reference["seconds"] += time.perf_counter() - start
            reference["cpu"] += time.process_time() - cpu

    trl.DPOTrainer._precompute_ref_logps = timed_precompute
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora)
    tokens, same = trl_tokens(trainer.train_dataset, data)
    start, cpu = time.perf_counter(), time.process_time()
    output = trainer.train()
    return {"seconds": time.perf_counter() - start + reference["seconds"],
            "cpu_seconds": time.process_time() - cpu + reference["cpu"], "reference_s": reference["seconds"],
            "loss": output.training_loss,
            "dtype": "bfloat16" if trainer.args.bf16 else "float32", "tokens": tokens, "same_ids": same}


def real_tokens(data: Path, steps: int, batch_size: int) -> int:
    """Real tokens of one epoch of ``data`` as we render it (``steps`` steps of ``batch_size`` pairs: the data
    holds exactly that many pairs); writes our token ids beside the data for the TRL worker to compare with its own,
    and the HF tokenizer it uses."""
    from scratchlm.align.data import load_preferences
    from scratchlm.llm import LLM

    llm = LLM.load(MODEL, dtype="float32")
    pairs, _ = load_preferences(data, llm.template, llm.tokenizer, 1024)
    assert len(pairs) == steps * batch_size, "the data must hold one epoch of the timed steps"
    (data.parent / "hf-tokenizer").mkdir(exist_ok=True)
    tokenizer = hf_tokenizer(llm, data.parent / "hf-tokenizer")
    tokenizer.save_pretrained(data.parent / "hf-tokenizer")  # for the TRL workers
    ids = [[p.prompt, p.chosen, p.rejected] for p in pairs]
    (data.parent / "scratchlm-ids.json").write_text(json.dumps(ids))
    return sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)


def trl_tokens(dataset, data: Path) -> tuple[int, bool]:
    """Real tokens of TRL's tokenized training set (every chosen and rejected sequence with its prompt), and whether
    its ids equal ours pair for pair (``real_tokens`` wrote ours)."""
    ours = json.loads((data.parent / "scratchlm-ids.json").read_text())
    theirs = [[row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]] for row in dataset]
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in theirs)
    return tokens, theirs == ours


def run_worker(args) -> None:
    out = Path(tempfile.mkdtemp(prefix="align-bench-"))
    if args.worker.startswith("scratchlm"):
        result = worker_scratchlm(Path(args.data), args.steps, args.batch_size, out,
                                  checkpointing=args.worker == "scratchlm", dtype=args.dtype)
    else:
        result = worker_trl(Path(args.data), args.steps, args.batch_size, out, args.worker == "trl-precompute",
                            args.dtype)
    result["peak_rss_mib"] = rss_mib()
    print("RESULT " + json.dumps(result))


def run_engine(engine: str, data: Path, steps: int, batch_size: int, dtype: str) -> dict:
    command = [sys.executable, __file__, "--worker", engine, "--data", str(data), "--steps", str(steps),
               "--batch-size", str(batch_size), "--threads", str(THREADS), "--dtype", dtype]
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{engine} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def versions() -> str:
    import torch
    import transformers
    import trl

    return f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"


def speed(args) -> str:
    data_dir = Path(tempfile.mkdtemp(prefix="align-data-"))
    # Message lists: TRL renders those with the chat template, as we render every record; plain strings it would
    # tokenize raw (no template, no system prompt: 2.5x fewer tokens per pair than ours on this set, which is
    # what the rows recorded before 2026-12-02 04:00 UTC compared, each engine credited with our token count).
    data, _ = write_data(data_dir, n_train=args.steps * args.batch_size, conversational=True)
    tokens = real_tokens(data, args.steps, args.batch_size)
    print(f"{args.steps} steps of {args.batch_size} pairs: {tokens:,} real tokens (chat template rendered)")
    engines = args.engines.split(",")
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    load_before = load_average()
    for round_ in range(args.rounds):
        for engine in engines if round_ % 2 == 0 else engines[::-1]:
            result = run_engine(engine, data, args.steps, args.batch_size, args.dtype)
            if result["dtype"] != args.dtype:
                raise SystemExit(f"{engine} ran in {result['dtype']}, not {args.dtype}: not the same work")
            if result.get("tokens", tokens) != tokens or not result.get("same_ids", True):
                raise SystemExit(f"{engine} trained on other token ids ({result['tokens']:,} tokens against our "
                                 f"{tokens:,}): not the same work")
            result["tokens_per_s"] = tokens / result["seconds"]
            result["tokens_per_cpu_s"] = tokens / result["cpu_seconds"]
            runs[engine].append(result)
            print(f"round {round_ + 1} {engine:<15} {result['tokens_per_s']:7.0f} tok/s  "
                  f"{result['seconds']:6.1f} s  CPU {result['cpu_seconds']:6.1f} s  peak RSS "
                  f"{result['peak_rss_mib']:6.0f} MiB  mean loss "
                  f"{result['loss']:.4f}  ({result['dtype']})", flush=True)
    load_after = load_average()

    def med(engine: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[engine])

    rows = ["| engine | tokens/s (median) | best | tokens per CPU second (median) | peak RSS MiB | "
            "mean loss over the steps |", "|---|---|---|---|---|---|"]
    for engine in engines:
        rows.append(f"| {engine} | {med(engine, 'tokens_per_s'):.0f} | "
                    f"{max(r['tokens_per_s'] for r in runs[engine]):.0f} | {med(engine, 'tokens_per_cpu_s'):.0f} | "
                    f"{med(engine, 'peak_rss_mib'):.0f} | {med(engine, 'loss'):.4f} |")
    ratios = []
    ours = [e for e in engines if e.startswith("scratchlm")][0]
    for peer in [e for e in ("trl", "trl-precompute") if e in runs]:
        speed_ratio = med(ours, "tokens_per_s") / med(peer, "tokens_per_s")
        cpu_ratio = med(ours, "tokens_per_cpu_s") / med(peer, "tokens_per_cpu_s")
        rss_ratio = med(ours, "peak_rss_mib") / med(peer, "peak_rss_mib")
        ratios.append(f"{ours} / {peer}: tokens/s {speed_ratio:.2f}x (target >= 1.0x), tokens per CPU second "
                      f"{cpu_ratio:.2f}x, peak RSS {rss_ratio:.2f}x (target <= 0.8x)")
    table = "\n".join(rows) + "\n\n" + "\n".join(f"- {r}" for r in ratios)
    print(table)
    return (f"\n## DPO vs TRL DPOTrainer, LoRA on CPU ({datetime.date.today()})\n\n"
            f"Machine: {machine()} ({platform.machine()}), {THREADS} threads; load average {load_before} before, "
            f"{load_after} after. {versions()}.\nCommand: `.venv/bin/python benchmarks/align.py --rounds {args.rounds} "
            f"--steps {args.steps} --threads {THREADS} --engines {args.engines} --dtype {args.dtype}`. "
            f"SmolLM2-135M-Instruct (GGUF, {args.dtype} for both engines), {args.steps} steps of {args.batch_size} "
            f"pairs of the demonstration set ({tokens:,} real tokens), LoRA r 8 / alpha 16 on all 7 projections, "
            f"beta 0.1, activation checkpointing on (TRL's default); time includes the reference log-probabilities; "
            "records in TRL's conversational layout, so both engines train on the same chat-template ids (checked); "
            f"{args.rounds} rounds, alternating order.\n\n"
            f"{table}\n")


# ---- the demonstration -----------------------------------------------------------------------------------------
def demo_dpo(args) -> str:
    import torch

    from scratchlm.align.dpo import REFERENCE_FILE, run_dpo
    from scratchlm.align.run import AlignOptions
    from scratchlm.llm import LLM

    torch.set_num_threads(THREADS)
    gen = make_preferences()
    started = time.perf_counter()
    out = ROOT / "runs" / "align-demo"
    train, test = write_data(out / "data")
    prompts = [json.loads(line)["prompt"] for line in test.read_text().splitlines()]

    base = LLM.load(MODEL, dtype="float32")
    t0 = time.perf_counter()
    before = base.chat(prompts, temperature=0, max_new_tokens=args.max_new_tokens)
    gen_before = time.perf_counter() - t0
    del base

    t0 = time.perf_counter()
    result = run_dpo(AlignOptions(model=MODEL, data=str(train), val_data=str(test), out=str(out / "dpo"),
                                  beta=args.beta, lr=args.lr, max_steps=args.steps, batch_size=args.batch_size,
                                  eval_interval=max(1, args.steps // 4), force=True, progress=True))
    train_s = time.perf_counter() - t0
    from safetensors.torch import load_file

    ref = load_file(out / "dpo" / REFERENCE_FILE)["val"]
    base_prefers = (ref[:, 0] > ref[:, 1]).float().mean().item()
    evals = [r for r in result.history if "val_accuracy" in r]
    tuned = LLM.load(MODEL, dtype="float32", adapter=out / "dpo" / "best")
    t0 = time.perf_counter()
    after = tuned.chat(prompts, temperature=0, max_new_tokens=args.max_new_tokens)
    gen_after = time.perf_counter() - t0
    total = time.perf_counter() - started
    styled_before = sum(map(gen.follows_style, before)) / len(prompts)
    styled_after = sum(map(gen.follows_style, after)) / len(prompts)
    lines = [f"held-out pairs: {len(prompts)} (templates and subjects not in the {sum(1 for _ in train.open())} "
             "training pairs)",
             f"preference accuracy (chosen log-ratio above rejected): step 0 every implicit reward is 0 (a tie on "
             f"every pair: 50% as a coin toss, 0% counting ties as wrong, as TRL does); the base model itself gives "
             f"the chosen answer the higher log-probability on {base_prefers:.0%} of the pairs",
             "after DPO: " + ", ".join(f"step {r['step']} {r['val_accuracy']:.1%} (margin {r['val_margin']:.2f})"
                                       for r in evals),
             f"answers that open with \"{gen.OPENER}\" (greedy, {args.max_new_tokens} new tokens): base "
             f"{styled_before:.0%}, after DPO {styled_after:.0%}",
             f"time: DPO {train_s:.0f} s ({args.steps} steps of {args.batch_size} pairs, lr {args.lr:g}, beta "
             f"{args.beta:g}), answers {gen_before:.0f} s + {gen_after:.0f} s, whole demonstration {total:.0f} s",
             "examples:"] + [f"  {p!r}\n    base: {b!r}\n    DPO:  {a!r}" for p, b, a in
                             list(zip(prompts, before, after))[:3]]
    text = "\n".join(lines)
    print(text)
    return (f"\n## DPO demonstration: a style from preferences alone ({datetime.date.today()})\n\n"
            f"Machine: {machine()}, {THREADS} threads; load average {load_average()} at the end.\n"
            f"Command: `.venv/bin/python benchmarks/align.py --demo dpo --steps {args.steps} --lr {args.lr:g} "
            f"--beta {args.beta:g} --threads {THREADS}`. SmolLM2-135M-Instruct, LoRA r 8 / alpha 16 on all 7 "
            "projections; data from "
            f"`scripts/make_preferences.py` (chosen answers open with \"{gen.OPENER}\").\n\n```\n{text}\n```\n")


def main() -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", choices=["dpo"], default=None, help="run a demonstration instead of the benchmark")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 12; demo 60)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (default 8)")
    parser.add_argument("--engines", default="scratchlm,trl,trl-precompute",
                        help="benchmark: engines to run, comma-separated: scratchlm, scratchlm-no-checkpointing, trl, "
                             "trl-precompute (default scratchlm,trl,trl-precompute)")
    parser.add_argument("--rounds", type=int, default=3, help="benchmark rounds (default 3)")
    parser.add_argument("--lr", type=float, default=5e-4, help="demo: learning rate (default 5e-4)")
    parser.add_argument("--beta", type=float, default=0.1, help="demo: beta (default 0.1)")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="demo: tokens per answer (default 12)")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="benchmark: precision of both engines (bfloat16 = autocast; default float32)")
    parser.add_argument("--record", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    THREADS = args.threads
    if args.worker:
        args.steps = args.steps or 12
        run_worker(args)
        return
    if args.demo == "dpo":
        args.steps = args.steps or 60
        text = demo_dpo(args)
    else:
        args.steps = args.steps or 12
        text = speed(args)
    if args.record:
        append_results(text)


if __name__ == "__main__":
    main()
