"""Fine-tuning speed and memory on SmolLM2-135M-Instruct: scratchlm full, LoRA and QLoRA against HF PEFT LoRA.

    .venv/bin/python benchmarks/finetune.py              # every engine, prints a table and the target ratios
    .venv/bin/python benchmarks/finetune.py --record     # ... and appends it to benchmarks/RESULTS.md

Same work for every engine: the same batches of the demonstration task (examples/task/train.jsonl rendered
with SmolLM2's chat template, assistant-only targets, right padding; made once by this script and handed
to the workers as a file), float32, 2 threads, AdamW (fused, no weight decay), gradient clipping at 1.0,
LoRA rank 8, alpha 16, dropout 0 (PEFT's default) on q,k,v,o,gate,up,down. scratchlm trains through its own
training loop (``train.loop.train`` with the fine-tuning loss, as ``scratchlm finetune`` does); PEFT wraps
transformers' LlamaForCausalLM loaded from the same GGUF (``use_cache`` off, as for training) in a plain loop
of forward, the same loss, backward, clip, step.

The machine is shared, so the engines run in rounds, each round in the opposite order of the one before;
a ratio uses the medians over all rounds. Every engine runs in a fresh process, so its peak RSS
(``ru_maxrss``: loading included) is its own. Training tokens/s = padded tokens of a step / the step's
time (forward, backward, optimizer), after one warm-up step; median and best over the timed steps.
Frozen-weight memory = bytes of every base-model parameter and buffer that does not train (each storage
once): float32 for LoRA and PEFT, NF4 with double quantization for QLoRA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import append_results

THREADS = 2
ROOT = Path(__file__).resolve().parent.parent
TASK = ROOT / "examples" / "task" / "train.jsonl"
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENGINES = ("lora", "peft", "full", "qlora")
# Not in the default set: scratchlm LoRA with logits at every position (as PEFT computes them), to show how
# much of the speed comes from projecting only the positions with a target.
EXTRA_ENGINES = ("lora-all-logits",)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_batches(path: Path, n: int, batch_size: int) -> None:
    """The first n batches of the task, as scratchlm finetune makes them, saved for the workers."""
    from safetensors.torch import save_file

    from scratchlm.finetune.data import SFTBatches, load_examples
    from scratchlm.llm import LLM

    llm = LLM.load("smollm2-135m-instruct")
    examples, _ = load_examples(TASK, llm.template, llm.tokenizer, 512)
    batches = SFTBatches(examples, batch_size, llm.tokenizer.eos_id, seed=0)
    tensors = {}
    for i in range(n):
        x, y = next(batches)
        tensors[f"x{i}"], tensors[f"y{i}"] = x.contiguous(), y.contiguous()
    save_file(tensors, str(path))


def load_batches(path: str) -> list:
    from safetensors.torch import load_file

    t = load_file(path)
    return [(t[f"x{i}"], t[f"y{i}"]) for i in range(len(t) // 2)]


# ---- workers (one engine per process) ---------------------------------------------------------------------------
def worker_scratchlm(method: str, batches: list, checkpointing: bool) -> dict:
    from scratchlm.finetune.lora import LoraSettings, apply_lora, lora_parameter_names
    from scratchlm.finetune.nf4 import frozen_weight_bytes, quantize_base
    from scratchlm.finetune.run import sft_loss
    from scratchlm.llm import LLM
    from scratchlm.train.loop import TrainConfig, train

    model = LLM.load("smollm2-135m-instruct").model
    trainable = None
    loss_fn = sft_loss
    if method == "lora-all-logits":
        method, loss_fn = "lora", None
    if method in ("lora", "qlora"):
        if method == "qlora":
            quantize_base(model)
        apply_lora(model, LoraSettings(rank=8, alpha=16, dropout=0.0, targets=TARGETS), seed=0)
        trainable = lora_parameter_names(model)
    frozen = frozen_weight_bytes(model) if trainable is not None else 0
    rss_loaded = rss_mib()
    config = TrainConfig(max_steps=len(batches), batch_size=batches[0][0].shape[0], lr=2e-4, min_lr=2e-4,
                         warmup_steps=0, weight_decay=0.0, eval_interval=10**6, grad_clip=1.0,
                         activation_checkpointing=checkpointing)
    result = train(model, config, iter(batches), trainable=trainable, loss_fn=loss_fn)
    steps = [(r["tokens_per_s"], r["step_time"]) for r in result.history if "tokens_per_s" in r]
    return {"rates": [rate for rate, _ in steps[1:]], "rss_loaded": rss_loaded, "frozen_bytes": frozen,
            "losses": [r["loss"] for r in result.history if "loss" in r]}


def worker_peft(batches: list, checkpointing: bool) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from scratchlm.hub import model_path
    from scratchlm.train.loop import lm_loss

    gguf = model_path("smollm2-135m-instruct")
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.config.use_cache = False
    if checkpointing:  # non-reentrant, as scratchlm's (torch.utils.checkpoint, use_reentrant=False)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=HF_TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    seen, frozen = set(), 0
    for p in model.parameters():
        if not p.requires_grad and p.untyped_storage().data_ptr() not in seen:
            seen.add(p.untyped_storage().data_ptr())
            frozen += p.untyped_storage().nbytes()
    rss_loaded = rss_mib()
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)
    torch.manual_seed(1337)
    rates, losses = [], []
    for x, y in batches:
        t0 = time.perf_counter()
        loss = lm_loss(model(input_ids=x).logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rates.append(x.numel() / (time.perf_counter() - t0))
        losses.append(loss.item())
    return {"rates": rates[1:], "rss_loaded": rss_loaded, "frozen_bytes": frozen, "losses": losses}


def run_worker(engine: str, batch_file: str, checkpointing: bool) -> None:
    import torch

    torch.set_num_threads(THREADS)
    batches = load_batches(batch_file)
    if engine == "peft":
        result = worker_peft(batches, checkpointing)
    else:
        result = worker_scratchlm(engine, batches, checkpointing)
    result["peak_rss"] = rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


# ---- driver -------------------------------------------------------------------------------------------------------
def run_engine(engine: str, batch_file: str, checkpointing: bool) -> dict:
    start = time.perf_counter()
    command = [sys.executable, __file__, "--worker", engine, "--batches", batch_file]
    proc = subprocess.run(command + (["--activation-checkpointing"] if checkpointing else []),
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{engine} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall"] = time.perf_counter() - start
    return result


def versions() -> str:
    import peft
    import torch
    import transformers

    return (f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}")


def cpu_name() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per engine (after 1 warm-up step)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="comma-separated, from " + ",".join(ENGINES + EXTRA_ENGINES))
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the engines, alternating order")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each block in backward, in every engine (less activation memory)")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batches", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.batches, args.activation_checkpointing)
        return

    load_before = open("/proc/loadavg").read().split()[:3]
    engines = args.engines.split(",")
    runs: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = str(Path(tmp) / "batches.safetensors")
        make_batches(Path(batch_file), args.steps + 1, args.batch_size)
        for round_index in range(args.rounds):
            for engine in engines if round_index % 2 == 0 else engines[::-1]:
                r = run_engine(engine, batch_file, args.activation_checkpointing)
                r["load"] = open("/proc/loadavg").read().split()[0]
                runs.append((engine, r))
                print(f"{engine}: {statistics.median(r['rates']):.1f} tokens/s, peak RSS {r['peak_rss']:.0f} MiB "
                      f"({r['wall']:.0f} s, load {r['load']})", file=sys.stderr)
    load_after = open("/proc/loadavg").read().split()[:3]
    table = format_table(runs, args, load_before, load_after)
    print(table)
    if args.record:
        append_results("\n" + table)


def format_table(runs: list[tuple[str, dict]], args, load_before, load_after) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Fine-tuning: full, LoRA and QLoRA against HF PEFT ({now})", "",
             f"Machine: {cpu_name()}, {THREADS} threads (shared; load average {' '.join(load_before)} before, "
             f"{' '.join(load_after)} after). {versions()}.",
             f"Command: `.venv/bin/python benchmarks/finetune.py --steps {args.steps} --batch-size {args.batch_size} "
             f"--rounds {args.rounds}{' --activation-checkpointing' if args.activation_checkpointing else ''}"
             f"{' --record' if args.record else ''}`", "",
             f"SmolLM2-135M-Instruct, float32, batches of {args.batch_size} task examples (padded), 1 warm-up + "
             f"{args.steps} timed steps per run; LoRA r=8, alpha 16, dropout 0, all 7 projections; activation "
             f"checkpointing {'on' if args.activation_checkpointing else 'off'} in every engine. One row per run "
             "(fresh process), in the order run.", "",
             "| run | engine | tokens/s (median / best) | peak RSS | RSS after load | frozen weights | loss, step 1 |"
             " load |", "|---|---|---|---|---|---|---|---|"]
    names = {"lora": "scratchlm LoRA", "peft": "HF PEFT LoRA", "full": "scratchlm full", "qlora": "scratchlm QLoRA",
             "lora-all-logits": "scratchlm LoRA, logits at every position"}
    for i, (engine, r) in enumerate(runs, start=1):
        frozen = f"{r['frozen_bytes'] / 2**20:.1f} MiB" if r["frozen_bytes"] else "(all trained)"
        lines.append(f"| {i} | {names[engine]} | {statistics.median(r['rates']):.1f} / {max(r['rates']):.1f} | "
                     f"{r['peak_rss']:.0f} MiB | {r['rss_loaded']:.0f} MiB | {frozen} | {r['losses'][0]:.4f} | "
                     f"{r['load']} |")
    lines.append("")

    def median_of(engine: str, key: str) -> float:
        values = [v for e, r in runs if e == engine for v in (r[key] if isinstance(r[key], list) else [r[key]])]
        return statistics.median(values)

    done = {e for e, _ in runs}
    checks = []
    if {"lora", "peft"} <= done:
        ratio = median_of("lora", "rates") / median_of("peft", "rates")
        checks.append(f"LoRA tokens/s / PEFT's = {ratio:.2f}x (target >= 1.0x)")
    if {"lora", "full"} <= done:
        ratio = median_of("lora", "peak_rss") / median_of("full", "peak_rss")
        checks.append(f"LoRA peak RSS / full's = {ratio:.2f}x (target <= 0.6x)")
    if {"lora", "qlora"} <= done:
        ratio = median_of("qlora", "frozen_bytes") / median_of("lora", "frozen_bytes")
        checks.append(f"QLoRA frozen-weight memory / LoRA's = {ratio:.3f}x (target <= 0.35x)")
    if {"lora-all-logits", "peft"} <= done:
        ratio = median_of("lora-all-logits", "rates") / median_of("peft", "rates")
        checks.append(f"LoRA with logits at every position / PEFT = {ratio:.2f}x")
    if {"qlora", "lora"} <= done:
        checks.append(f"QLoRA tokens/s / LoRA's = {median_of('qlora', 'rates') / median_of('lora', 'rates'):.2f}x")
    lines.append("Ratios (medians over all runs): " + "; ".join(checks) + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
