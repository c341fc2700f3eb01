"""Two scratchlm jobs on one small machine: training alone, and training while a chat generates.

Each job is a fresh process (OpenMP reads its settings when torch loads), with either

- **old** defaults: torch's own (every core, OpenMP's active wait policy), what the CLI did before, or
- **new** defaults: what ``scratchlm`` now sets before torch loads (``scratchlm.cpu``: ``GOMP_SPINCOUNT=1000``,
  threads from the CPUs free at start), or
- **spin** (with ``--spin N``): the new thread choice with another spin count (``GOMP_SPINCOUNT=N``),
  to compare.

The training job runs nanoGPT's CPU configuration (the ``shakespeare-char`` preset's model: 4 layers, 128
dimensions, context 64, batch 12, AdamW, gradient clipping) on random characters; the chat job loads
SmolLM2-135M-Instruct (float32) and answers a question again and again, 32 tokens each, as ``scratchlm chat``
does. The training job starts first (as a person would start it before opening a chat); training steps/s are
counted while the chat generates. Prints steps/s and the ratios::

    .venv/bin/python benchmarks/cpu_sharing.py [--seconds 20] [--record]

Targets (issue 21.6): new alone at most 5% slower than old alone; new shared at least 10x old shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from common import append_results, machine

ROOT = Path(__file__).resolve().parent.parent
OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


# ---- the two jobs (run as `python cpu_sharing.py --worker train|chat --defaults old|new`) ----------------
def apply_defaults(which: str, spin: int) -> int | None:
    if which in ("new", "spin"):
        from scratchlm import cpu

        if which == "spin":
            os.environ["GOMP_SPINCOUNT"] = str(spin)
        cpu.set_wait_policy()
        threads = cpu.choose_threads()
        if threads is not None:
            cpu.set_threads(threads)
        return threads
    return None


def train_worker(seconds: float) -> None:
    import torch
    import torch.nn.functional as F

    from scratchlm.config import ModelConfig
    from scratchlm.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=65, context_length=64, d_model=128, n_layers=4, n_heads=4, positions="learned",
                      norm="layernorm", mlp="gelu", bias=False, tie_embeddings=True, name="shakespeare-char")
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    print(json.dumps({"event": "ready", "threads": torch.get_num_threads(), "t": time.time()}), flush=True)
    end = time.time() + seconds
    while time.time() < end:
        x = torch.randint(0, 65, (12, 65))
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 65), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        print(json.dumps({"event": "step", "t": time.time()}), flush=True)


def chat_worker(seconds: float) -> None:
    import torch

    from scratchlm.llm import LLM

    llm = LLM.load("smollm2-135m-instruct")
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    llm.chat(messages, max_new_tokens=4, temperature=0)  # warm-up
    start = time.time()
    print(json.dumps({"event": "ready", "threads": torch.get_num_threads(), "t": start}), flush=True)
    tokens = 0
    while time.time() < start + seconds:
        tokens += len(llm.complete(messages, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids)
    print(json.dumps({"event": "done", "t": time.time(), "tokens": tokens}), flush=True)


# ---- the orchestra ----------------------------------------------------------------------------------
def spawn(kind: str, defaults: str, seconds: float, spin: int = 0) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    return subprocess.Popen([sys.executable, __file__, "--worker", kind, "--defaults", defaults, "--spin", str(spin),
                             "--seconds", str(seconds)], env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def events(proc: subprocess.Popen) -> list[dict]:
    out, _ = proc.communicate(timeout=600)
    if proc.returncode:
        raise SystemExit(f"a worker failed (exit {proc.returncode})")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def steps_per_s(train: list[dict], start: float, end: float) -> float:
    """Training steps finished per second between ``start`` and ``end`` (the last step, when ``end`` is inf)."""
    steps = [e["t"] for e in train if e["event"] == "step" and start <= e["t"] <= end]
    end = min(end, steps[-1]) if steps else end
    return len(steps) / (end - start) if end > start else 0.0


def run(defaults: str, shared: bool, seconds: float, spin: int) -> dict:
    warm = 3.0
    if not shared:
        train = events(spawn("train", defaults, seconds + warm, spin))
        ready = next(e for e in train if e["event"] == "ready")
        return {"steps_s": steps_per_s(train, ready["t"] + warm, float("inf")), "train_threads": ready["threads"]}
    trainer = spawn("train", defaults, 10 * seconds + 120, spin)  # stopped when the chat is done
    time.sleep(warm)
    chat = events(spawn("chat", defaults, seconds, spin))
    trainer.terminate()
    train = events_after_kill(trainer)
    start = next(e for e in chat if e["event"] == "ready")
    end = next(e for e in chat if e["event"] == "done")
    return {"steps_s": steps_per_s(train, start["t"], end["t"]),
            "chat_tok_s": end["tokens"] / (end["t"] - start["t"]), "chat_threads": start["threads"],
            "train_threads": next(e for e in train if e["event"] == "ready")["threads"]}


def events_after_kill(proc: subprocess.Popen) -> list[dict]:
    out, _ = proc.communicate(timeout=60)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run (default 20)")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--worker", choices=["train", "chat"], help=argparse.SUPPRESS)
    ap.add_argument("--spin", type=int, default=0,
                    help="also measure GOMP_SPINCOUNT=N with the new thread choice (e.g. 10000; default: not)")
    ap.add_argument("--defaults", choices=["old", "new", "spin"], default="new", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        apply_defaults(args.defaults, args.spin)
        (train_worker if args.worker == "train" else chat_worker)(args.seconds)
        return

    load = os.getloadavg()[0]
    results = {}
    for shared in (False, True):
        for defaults in ("old", "new", "spin") if args.spin else ("old", "new"):
            r = run(defaults, shared, args.seconds, args.spin)
            results[defaults, shared] = r
            extra = (f", chat {r['chat_tok_s']:.1f} tok/s ({r['chat_threads']} threads)" if shared else "")
            print(f"{'train + chat' if shared else 'train alone':<13} {defaults} defaults: "
                  f"{r['steps_s']:7.2f} steps/s ({r['train_threads']} threads){extra}", flush=True)
    alone = results["new", False]["steps_s"] / results["old", False]["steps_s"]
    old_shared = results["old", True]["steps_s"]
    shared = results["new", True]["steps_s"] / old_shared if old_shared else float("inf")
    print(f"alone: new / old = {alone:.3f} (target >= 0.95); shared: new / old = {shared:.1f}x (target >= 10x)")
    if args.spin:
        spin_alone = results["spin", False]["steps_s"] / results["old", False]["steps_s"]
        spin_shared = results["spin", True]["steps_s"] / old_shared if old_shared else float("inf")
        print(f"spin {args.spin}: alone / old = {spin_alone:.3f}; shared / old = {spin_shared:.1f}x")
    if args.record:
        rows = []
        for (defaults, is_shared), r in results.items():
            chat = f"{r['chat_tok_s']:.1f} ({r['chat_threads']} threads)" if is_shared else "-"
            rows.append(f"| {'train + chat' if is_shared else 'train alone'} | {defaults} | {r['steps_s']:.2f} "
                        f"({r['train_threads']} threads) | {chat} |")
        append_results("\n".join([
            "", f"## CPU sharing: training alone and beside a chat ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
            "", f"Machine: {machine()}, load average {load:.1f} at the start. Command: "
            f"`python benchmarks/cpu_sharing.py {' '.join(sys.argv[1:])}`. old = torch's defaults (all cores, "
            "active OpenMP wait); new = scratchlm.cpu (GOMP_SPINCOUNT=1000, threads from the free CPUs).", "",
            "| jobs | defaults | train steps/s | chat tok/s |", "|---|---|---|---|", *rows, "",
            f"alone new/old = {alone:.3f} (target >= 0.95); shared new/old = {shared:.1f}x (target >= 10x).", ""]))


if __name__ == "__main__":
    main()
