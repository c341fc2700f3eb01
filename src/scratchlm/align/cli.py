"""``scratchlm align METHOD``: the command-line face of ``scratchlm.align``.

    scratchlm align reward smollm2-135m-instruct --data prefs.jsonl --out runs/rm
    scratchlm align score runs/rm/best --data prefs.jsonl
    scratchlm align dpo smollm2-135m-instruct --data prefs.jsonl --beta 0.1 --out runs/dpo
    scratchlm align dpo smollm2-135m-instruct --data prefs.jsonl --loss ipo --method full --out runs/ipo
    scratchlm align dpo --out runs/dpo --resume

Every training method takes ``finetune``'s flags (declared once in ``finetune.cli``) and writes its run layout.

Adding a method: write ``add_METHOD(sub)`` that adds its parser (argparse only at import time; heavy imports
inside the command function) and name it in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib

from scratchlm.cli_options import add_progress_flag, show_progress
from scratchlm.finetune.cli import add_data_flags, add_lora_flags, add_run_flags, add_training_flags, training_kwargs

# "module:function" of each `scratchlm align` subcommand, in the order `--help` lists them.
SUBCOMMANDS: list[str] = [
    "scratchlm.align.cli:add_reward",
    "scratchlm.align.cli:add_score",
    "scratchlm.align.cli:add_dpo",
    "scratchlm.align.rl_cli:add_ppo",
    "scratchlm.align.rl_cli:add_grpo",
]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``scratchlm align`` and its methods."""
    p = sub.add_parser("align", help="align a model with preferences: reward model, DPO/IPO, PPO, GRPO",
                       description="Alignment on top of fine-tuning (docs/alignment.md).")
    methods = p.add_subparsers(dest="align_command", required=True, metavar="METHOD")
    for entry in SUBCOMMANDS:
        module, _, function = entry.partition(":")
        getattr(importlib.import_module(module), function)(methods)


def add_training_run(p: argparse.ArgumentParser, default_lr: str, data_help: str = "preference JSONL: "
                     "{\"prompt\", \"chosen\", \"rejected\"} per line (not needed with --resume)") -> None:
    """The base model, --data, --out, --method lora|full and every flag ``finetune`` takes: what each training
    method of ``align`` shares."""
    p.add_argument("model", nargs="?", default=None,
                   help="known model name, .gguf file, or model directory (not needed with --resume)")
    p.add_argument("--data", default=None, help=data_help)
    p.add_argument("--out", required=True, help="output directory (checkpoints, metrics.jsonl, loss.png, run.json)")
    p.add_argument("--method", choices=["lora", "full"], default=None,
                   help="lora (default: a PEFT adapter) or full (every weight)")
    add_lora_flags(p)
    add_training_flags(p, default_lr)
    add_data_flags(p)
    add_run_flags(p)


def options(args: argparse.Namespace, **extra):
    """``AlignOptions`` from the shared flags and a method's own."""
    from scratchlm.align.run import AlignOptions

    return AlignOptions(**training_kwargs(args), **extra)


# ---- reward ---------------------------------------------------------------------------------------------------
def add_reward(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reward", help="train a reward model on preference pairs (Bradley-Terry)",
                       description="A scalar head on the last token, trained so that chosen answers score above "
                                   "rejected ones; reports held-out preference accuracy. OUT/best loads with "
                                   "`scratchlm align score` and as PPO's --reward.")
    add_training_run(p, "1e-4 LoRA, 1e-5 full")
    p.set_defaults(func=cmd_reward)


def cmd_reward(args: argparse.Namespace) -> None:
    from scratchlm.align.reward import run_reward

    run_reward(options(args))


def add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="print a reward model's rewards for a JSONL file",
                       description="One JSON line per input line: {\"line\", \"chosen\", \"rejected\"} for a "
                                   "preference pair, {\"line\", \"reward\"} for a conversation ({\"messages\"} or "
                                   "{\"prompt\", \"completion\"}); then the preference accuracy, when there are pairs.")
    p.add_argument("reward_model", help="a reward model directory (OUT/best of `scratchlm align reward`)")
    p.add_argument("--data", required=True, help="preference or conversation JSONL")
    p.add_argument("--base", default=None, help="the base model of a LoRA reward model (default: the recorded one)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    add_progress_flag(p)
    p.set_defaults(func=cmd_score)


def cmd_score(args: argparse.Namespace) -> None:
    import json
    import sys

    from scratchlm.align.reward import score_file
    from scratchlm.errors import ConfigError

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    results = score_file(args.reward_model, args.data, args.batch_size, args.base, show_progress(args))
    for row in results:
        print(json.dumps(row))
    pairs = [r for r in results if "chosen" in r]
    if pairs:
        right = sum(r["chosen"] > r["rejected"] for r in pairs)
        print(f"preference accuracy {right / len(pairs):.1%} ({right} of {len(pairs)} pairs)", file=sys.stderr)


# ---- DPO ------------------------------------------------------------------------------------------------------
def add_dpo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dpo", help="direct preference optimisation (DPO, IPO) on preference pairs",
                       description="DPO (Rafailov et al. 2023) or IPO: the policy learns from pairs directly, "
                                   "against reference log-probabilities computed once with the adapter off. Logs "
                                   "loss, implicit rewards, margins and preference accuracy; OUT/best is a PEFT "
                                   "adapter (with --method lora) usable with --adapter, merge and PEFT.")
    add_training_run(p, "5e-5 LoRA, 5e-7 full")
    g = p.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=None,
                   help="strength of the KL pull towards the reference (default 0.1; smaller moves further)")
    g.add_argument("--loss", choices=["sigmoid", "ipo"], default=None,
                   help="sigmoid: DPO's -log sigmoid(beta h) (default); ipo: (h - 1/(2 beta))^2 per token")
    p.set_defaults(func=cmd_dpo)


def cmd_dpo(args: argparse.Namespace) -> None:
    from scratchlm.align.dpo import run_dpo

    run_dpo(options(args, beta=args.beta, loss=args.loss))
