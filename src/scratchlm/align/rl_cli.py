"""``scratchlm align ppo`` and ``scratchlm align grpo``: the command-line face of ``align.rl``.

    scratchlm align grpo smollm2-135m-instruct --prompts train.jsonl \\
        --reward scratchlm.align.rewards:final_number_reward --out runs/grpo
    scratchlm align ppo smollm2-135m-instruct --prompts prompts.jsonl --reward runs/rm/best --out runs/ppo
    scratchlm align ppo --out runs/ppo --resume

Both take ``finetune``'s LoRA, training and run flags (``--batch-size`` counts prompts per step, ``--max-steps``
steps of rollouts and updates, ``--epochs`` passes over the prompts).
"""

from __future__ import annotations

import argparse

from scratchlm.finetune.cli import add_lora_flags, add_run_flags, add_training_flags


def _add_common(p: argparse.ArgumentParser, algorithm: str) -> None:
    from scratchlm.align.rl_defaults import DEFAULTS

    d = DEFAULTS[algorithm]
    p.add_argument("model", nargs="?", default=None,
                   help="known model name, .gguf file, or model directory (not needed with --resume)")
    p.add_argument("--prompts", default=None, help="JSONL of {\"prompt\": \"text\"} or {\"prompt\": [messages]} "
                                                   "(not needed with --resume)")
    p.add_argument("--reward", default=None,
                   help="a reward model directory (OUT/best of `scratchlm align reward`), or a Python function "
                        "module:function or file.py:function called as f(prompt, completion) -> float")
    p.add_argument("--out", required=True, help="output directory (checkpoints, metrics.jsonl, reward.png, run.json)")
    add_lora_flags(p)
    add_training_flags(p, f"{d['lr']:g}")
    for action in p._actions:  # the shared flags' help speaks of examples; here they count prompts and passes
        if "--batch-size" in action.option_strings:
            action.help = f"prompts per step (default {d['batch_size']})"
        elif "--epochs" in action.option_strings:
            action.help = "passes over the prompts (default 1 when --max-steps is not given)"
        elif "--max-steps" in action.option_strings:
            action.help = "steps of rollouts and updates instead of --epochs"
        elif "--grad-accum" in action.option_strings:
            action.help = "micro-batches per minibatch, to save memory (default 1)"
    g = p.add_argument_group("rollouts")
    g.add_argument("--val-prompts", default=None, help="held-out prompts (default: --val-fraction of --prompts)")
    g.add_argument("--val-fraction", type=float, default=None, help="share of --prompts held out (default 0.1)")
    g.add_argument("--max-eval-prompts", type=int, default=None,
                   help=f"held-out prompts answered per evaluation (default {d['max_eval_prompts']})")
    g.add_argument("--num-generations", dest="group_size", type=int, default=None,
                   help=f"completions sampled per prompt (default {d['group_size']})")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens per completion at most (default {d['max_new_tokens']})")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1)")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens (default: all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: off)")
    g.add_argument("--max-prompt-length", type=int, default=None,
                   help=f"longer prompts are an error (default {d['max_prompt_length']} tokens)")
    g = p.add_argument_group("policy update")
    g.add_argument("--ppo-epochs", type=int, default=None,
                   help=f"passes over each batch of rollouts (default {d['ppo_epochs']})")
    g.add_argument("--minibatch-size", type=int, default=None,
                   help=f"completions per optimizer step (default {d['minibatch_size']})")
    g.add_argument("--kl-coef", type=float, default=None,
                   help=f"weight of the KL to the reference (default {d['kl_coef']}; 0 turns it off)")
    g.add_argument("--clip", type=float, default=None, help="policy ratio clip epsilon (default 0.2)")
    if algorithm == "ppo":
        g.add_argument("--value-clip", type=float, default=None, help="value clip epsilon (default 0.2)")
        g.add_argument("--vf-coef", type=float, default=None, help=f"value loss weight (default {d['vf_coef']})")
        g.add_argument("--gamma", type=float, default=None, help="discount (default 1)")
        g.add_argument("--lam", type=float, default=None, help=f"GAE lambda (default {d['lam']})")
        g.add_argument("--no-whiten-rewards", dest="whiten_rewards", action="store_false", default=None,
                       help="keep the per-token rewards' scale (default: divide by their std over the batch)")
    add_run_flags(p)


def add_ppo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ppo", help="RLHF with PPO against a reward model or function (LoRA policy)",
                       description="PPO (InstructGPT's RLHF step): rollouts from the policy, a per-token KL penalty "
                                   "to the reference (the base with the adapter off), a value head, GAE, clipped "
                                   "policy and value losses, several epochs of minibatch updates per batch. "
                                   "--batch-size counts prompts per step. OUT/best is a PEFT adapter.")
    _add_common(p, "ppo")
    p.set_defaults(func=cmd_rl, algorithm="ppo")


def add_grpo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grpo", help="GRPO: groups of samples per prompt, rewards from a function or model",
                       description="GRPO (DeepSeekMath): --num-generations completions per prompt, advantages "
                                   "normalised within each group, no value network, optional KL to the reference. "
                                   "--batch-size counts prompts per step. OUT/best is a PEFT adapter.")
    _add_common(p, "grpo")
    p.set_defaults(func=cmd_rl, algorithm="grpo")


def cmd_rl(args: argparse.Namespace) -> None:
    from scratchlm.align.rl import RLOptions, run_rl

    ppo_only = {name: getattr(args, name, None) for name in ("value_clip", "vf_coef", "gamma", "lam",
                                                              "whiten_rewards")}
    run_rl(RLOptions(
        algorithm=args.algorithm, model=args.model, prompts=args.prompts, reward=args.reward, out=args.out,
        val_prompts=args.val_prompts, val_fraction=args.val_fraction, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, group_size=args.group_size, ppo_epochs=args.ppo_epochs,
        minibatch_size=args.minibatch_size, grad_accum_steps=args.grad_accum, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, rank=args.rank, alpha=args.alpha,
        dropout=args.dropout, targets=args.targets, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_prompt_length=args.max_prompt_length,
        kl_coef=args.kl_coef, clip=args.clip, eval_interval=args.eval_interval,
        max_eval_prompts=args.max_eval_prompts, dtype=args.dtype,
        activation_checkpointing=args.activation_checkpointing, seed=args.seed,
        resume=args.resume, force=args.force, progress=not args.no_progress, **ppo_only,
    ))
