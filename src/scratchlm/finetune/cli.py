"""``scratchlm finetune`` and ``scratchlm merge``: the command-line face of ``scratchlm.finetune``.

    scratchlm finetune smollm2-135m-instruct --data train.jsonl --method lora --epochs 2 --out runs/task
    scratchlm finetune smollm2-135m-instruct --data train.jsonl --method qlora --rank 16 --out runs/q
    scratchlm finetune --out runs/task --resume                    # continue exactly where it stopped
    scratchlm finetune --out runs/task --resume --max-steps 200    # ...and train it longer
    torchrun --nproc_per_node 2 -m scratchlm.cli finetune smollm2-135m-instruct --data train.jsonl --out runs/dp
    torchrun --nproc_per_node 2 -m scratchlm.cli finetune MODEL --data train.jsonl --method full --parallel fsdp \
        --out runs/fsdp                                            # full fine-tuning, sharded (ZeRO-3)
    scratchlm merge smollm2-135m-instruct runs/task/best --out merged-model
    scratchlm chat smollm2-135m-instruct --adapter runs/task/best
"""

from __future__ import annotations

import argparse

from scratchlm.cli_options import add_group_size_flag, add_progress_flag, show_progress


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``finetune`` and ``merge`` subcommands."""
    p = sub.add_parser("finetune", help="fine-tune a model on chat JSONL (LoRA, QLoRA or full)",
                       description="Supervised fine-tuning on conversations; the loss covers the assistant's "
                                   "tokens only. Data: one {\"messages\": [...]} or {\"prompt\", \"completion\"} "
                                   "object per line. OUT/run.json records the run, so --resume needs only --out; "
                                   "with --resume only --max-steps, --epochs and --eval-interval may differ from "
                                   "the recorded run.")
    p.add_argument("model", nargs="?", default=None,
                   help="known model name, .gguf file, or model directory (not needed with --resume)")
    p.add_argument("--data", default=None, help="training JSONL (not needed with --resume)")
    p.add_argument("--out", required=True, help="output directory (checkpoints, metrics.jsonl, loss.png, run.json)")
    p.add_argument("--method", choices=["lora", "qlora", "full"], default=None,
                   help="lora (default), qlora (4-bit NF4 frozen base + LoRA) or full (every weight)")
    add_lora_flags(p)
    add_training_flags(p)
    add_data_flags(p)
    add_transfer_flags(p)
    add_run_flags(p)
    g = p.add_argument_group("quantization-aware training")
    g.add_argument("--qat", choices=["int4"], default=None,
                   help="train through the int4 weights `scratchlm quantize --to int4` will make (lora or full)")
    add_group_size_flag(g, help="with --qat: int4 group, 32 (default), 64, 128 or channel; quantize with the same")
    from scratchlm.train.parallel.mesh import add_parallel_flags

    add_parallel_flags(p)  # under torchrun: dp (LoRA, QLoRA, full), zero1, fsdp, tp, fsdp+tp (full)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model and save the result")
    p.add_argument("base", help="the base model: known name, .gguf file, or model directory")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="directory for the merged model (LLM.load reads it)")
    p.add_argument("--force", action="store_true", help="replace an existing model directory at --out")
    add_progress_flag(p)
    p.set_defaults(func=cmd_merge)


def add_lora_flags(p: argparse.ArgumentParser) -> None:
    """--rank, --alpha, --dropout, --targets: the LoRA settings (finetune and every align command)."""
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=None, help="rank r of the update B @ A (default 8)")
    g.add_argument("--alpha", type=float, default=None, help="scaling numerator: the update is alpha/r B @ A "
                                                             "(default 16)")
    g.add_argument("--dropout", type=float, default=None, help="dropout on the LoRA input (default 0, as PEFT)")
    g.add_argument("--targets", default=None,
                   help="layers to adapt, comma-separated: q,k,v,o,gate,up,down (default all)")


def add_training_flags(p: argparse.ArgumentParser, default_lr: str = "2e-4 LoRA/QLoRA, 2e-5 full") -> None:
    """How long and how to train: --epochs/--max-steps, --batch-size, --grad-accum, --lr, ... (finetune and
    every align command; each reads them into the same option names)."""
    g = p.add_argument_group("training")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None, help="passes over the training data (default 1)")
    length.add_argument("--max-steps", type=int, default=None, help="optimizer steps instead of --epochs")
    g.add_argument("--batch-size", type=int, default=None, help="examples per micro-step (default 8)")
    g.add_argument("--grad-accum", type=int, default=None, help="micro-steps per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {default_lr})")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default 5%% of the steps)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0)")
    g.add_argument("--eval-interval", type=int, default=None,
                   help="evaluate and checkpoint every N steps (default: 5 times per run)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="bfloat16: mixed precision (default float32)")
    g.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute blocks in backward")
    g.add_argument("--seed", type=int, default=None, help="random seed (split, order, LoRA init, dropout; default 0)")


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """--val-data, --val-fraction, --max-length, --too-long (finetune and every align command)."""
    g = p.add_argument_group("data")
    g.add_argument("--val-data", default=None, help="validation JSONL (default: --val-fraction of --data)")
    g.add_argument("--val-fraction", type=float, default=None, help="share of --data held out (default 0.1)")
    g.add_argument("--max-length", type=int, default=None,
                   help="tokens per example (default: the model's context, at most 1024)")
    g.add_argument("--too-long", choices=["truncate", "skip"], default=None,
                   help="longer examples are cut (default) or dropped; the counts are reported")


def add_transfer_flags(p: argparse.ArgumentParser) -> None:
    """--task, --labels, --optimizer and the transfer-learning controls of ``finetune`` (finetune/freeze.py)."""
    g = p.add_argument_group("task and transfer learning")
    g.add_argument("--task", choices=["lm", "classify"], default=None,
                   help="lm: chat data, learn the assistant's tokens (default); classify: {\"text\", \"label\"} "
                        "data and a classification head on the last token")
    g.add_argument("--labels", default=None, help="classify: the class names in order, comma-separated")
    g.add_argument("--optimizer", choices=["adamw", "sgd", "rmsprop", "adafactor"], default=None,
                   help="torch's optimizer to use (default adamw)")
    g.add_argument("--momentum", type=float, default=None, help="SGD's and RMSprop's momentum (default 0.9)")
    g.add_argument("--freeze-layers", type=int, default=None,
                   help="keep the embeddings and the first N blocks frozen (default 0)")
    g.add_argument("--unfreeze-every", type=int, default=None,
                   help="gradual unfreezing: train the top first, one more block every N steps (default off)")
    g.add_argument("--layer-lr-decay", type=float, default=None,
                   help="discriminative rates: each layer group learns at this times the rate of the group above "
                        "(default 1; ULMFiT: 0.38)")


def transfer_kwargs(args: argparse.Namespace) -> dict:
    """The options of ``add_transfer_flags`` under their ``FinetuneOptions`` names."""
    return dict(task=args.task, labels=args.labels, optimizer=args.optimizer, momentum=args.momentum,
                freeze_layers=args.freeze_layers, unfreeze_every=args.unfreeze_every,
                layer_lr_decay=args.layer_lr_decay)


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """--resume, --force and --no-progress of a training run."""
    g = p.add_argument_group("run")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in OUT exactly, with its recorded model, data and options")
    g.add_argument("--force", action="store_true", help="replace a previous run in OUT")
    # The flag's former name, kept hidden so scripts written for it still work.
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def training_kwargs(args: argparse.Namespace) -> dict:
    """The options of ``add_lora_flags``, ``add_training_flags``, ``add_data_flags`` and ``add_run_flags`` under
    their option names (``FinetuneOptions`` and the align commands' options share them)."""
    return dict(
        model=args.model, data=args.data, out=args.out, method=args.method, rank=args.rank, alpha=args.alpha,
        dropout=args.dropout, targets=args.targets, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum_steps=args.grad_accum, lr=args.lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, max_length=args.max_length, too_long=args.too_long, val_data=args.val_data,
        val_fraction=args.val_fraction, eval_interval=args.eval_interval, dtype=args.dtype,
        activation_checkpointing=args.activation_checkpointing, seed=args.seed, resume=args.resume,
        force=args.force, progress=not args.no_progress,
    )


def cmd_finetune(args: argparse.Namespace) -> None:
    from scratchlm.finetune.run import FinetuneOptions, run_finetune
    from scratchlm.train.parallel.mesh import parallel_from_args

    run_finetune(FinetuneOptions(**training_kwargs(args), **transfer_kwargs(args), qat=args.qat,
                                 group_size=args.group_size, parallel=parallel_from_args(args),
                                 dist_timeout=args.dist_timeout))


def cmd_merge(args: argparse.Namespace) -> None:
    from pathlib import Path

    from scratchlm.finetune.merge import merge_to_directory

    out = merge_to_directory(args.base, args.adapter, Path(args.out), force=args.force, progress=show_progress(args))
    print(f"merged model written to {out}; try: scratchlm chat {out}")
