"""``scratchlm train``: the command-line face of ``scratchlm.train.run``.

    scratchlm train                                        # nanoGPT's shakespeare-char on the bundled corpus
    scratchlm train my_texts/ --preset shakespeare-bpe --out runs/mine --max-steps 500
    scratchlm train --out runs/mine --resume                 # continue it: same data, options, schedule
    scratchlm train --out runs/mine --resume --max-steps 8000  # ...and train it longer
    torchrun --nproc_per_node 2 -m scratchlm.cli train     # data-parallel over 2 processes
    torchrun --nproc_per_node 4 -m scratchlm.cli train --parallel fsdp+tp --tp 2   # FSDP x tensor parallel
"""

from __future__ import annotations

import argparse

# Flags that change TrainConfig fields: flag -> (field, type, help).
TRAIN_FLAGS = {
    "--max-steps": ("max_steps", int, "optimizer steps to train for (the cosine schedule follows)"),
    "--batch-size": ("batch_size", int, "sequences per micro-step, over all processes"),
    "--grad-accum": ("grad_accum_steps", int, "micro-steps accumulated per optimizer step"),
    "--lr": ("lr", float, "peak learning rate"),
    "--min-lr": ("min_lr", float, "learning rate at the end of the cosine decay"),
    "--warmup-steps": ("warmup_steps", int, "linear warm-up steps"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay on matrices"),
    "--grad-clip": ("grad_clip", float, "clip the gradient norm to this (0: off)"),
    "--eval-interval": ("eval_interval", int, "evaluate, sample and checkpoint every this many steps"),
    "--eval-batches": ("eval_batches", int, "validation batches per evaluation"),
    "--early-stopping": ("early_stopping", int, "stop after this many evaluations without improvement"),
    "--seed": ("seed", int, "random seed (weights, batches, dropout)"),
}
# Flags that change ModelConfig fields.
MODEL_FLAGS = {
    "--context-length": ("context_length", int, "tokens per training window"),
    "--n-layers": ("n_layers", int, "transformer blocks"),
    "--n-heads": ("n_heads", int, "attention heads"),
    "--d-model": ("d_model", int, "width of the residual stream"),
    "--dropout": ("dropout", float, "dropout probability while training"),
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    examples = __doc__.split("\n\n", 1)[1].split('"""')[0]
    p = sub.add_parser("train", help="train a GPT from scratch (default: Shakespeare, characters, ~2 minutes)",
                       description="Train a GPT from scratch; flags left out come from the preset. OUT/run.json "
                                   "records the run, so --resume needs no other flags; with --resume only "
                                   "--max-steps, --eval-interval, --early-stopping, --sample-tokens, --prompt, "
                                   "--device, --compile and --activation-checkpointing may differ from the "
                                   "recorded run.",
                       epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default=None,
                   help="text file, folder of .txt/.md files, or .jsonl (default: the bundled Shakespeare)")
    p.add_argument("--preset", default=None, help="shakespeare-char (default) or shakespeare-bpe")
    p.add_argument("--out", default=None, help="output directory (default runs/PRESET)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT exactly, with its recorded data and options")
    p.add_argument("--force", action="store_true", help="replace a previous run in OUT")
    # The flag's former name, kept hidden so scripts written for it still work.
    g = p.add_argument_group("training (defaults come from the preset)")
    for flag, (_, kind, text) in TRAIN_FLAGS.items():
        g.add_argument(flag, type=kind, default=None, help=text)
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="bfloat16: mixed precision")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    g.add_argument("--device", default=None, help="cpu, cuda or auto (default)")
    g = p.add_argument_group("model (defaults come from the preset)")
    for flag, (_, kind, text) in MODEL_FLAGS.items():
        g.add_argument(flag, type=kind, default=None, help=text)
    g = p.add_argument_group("data")
    g.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (BPE presets)")
    g.add_argument("--tokenizer", default=None, help="use this tokenizer.json instead of training one")
    g.add_argument("--text-field", default=None, help="JSONL field holding the text (default 'text')")
    g.add_argument("--val-fraction", type=float, default=None, help="share of tokens for validation (default 0.1)")
    g = p.add_argument_group("output")
    g.add_argument("--sample-tokens", type=int, default=None, help="tokens per sample at each evaluation (0: none)")
    g.add_argument("--prompt", default=None, help="text the samples start from (default a newline)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    from scratchlm.train.parallel.mesh import add_parallel_flags

    add_parallel_flags(p)
    p.set_defaults(func=cmd_train)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def cmd_train(args: argparse.Namespace) -> None:
    from scratchlm.train.parallel.mesh import parallel_from_args
    from scratchlm.train.run import RunOptions, run_training

    train = {name: getattr(args, _dest(flag)) for flag, (name, _, _) in TRAIN_FLAGS.items()
             if getattr(args, _dest(flag)) is not None}
    if args.dtype is not None:
        train["dtype"] = args.dtype
    if args.compile:
        train["compile"] = True
    if args.activation_checkpointing:
        train["activation_checkpointing"] = True
    model = {name: getattr(args, _dest(flag)) for flag, (name, _, _) in MODEL_FLAGS.items()
             if getattr(args, _dest(flag)) is not None}
    run_training(RunOptions(
        data=args.data, preset=args.preset, out=args.out, train=train, model=model, vocab_size=args.vocab_size,
        tokenizer=args.tokenizer, text_field=args.text_field, val_fraction=args.val_fraction, resume=args.resume,
        force=args.force, device=args.device, progress=not args.no_progress,
        sample_tokens=args.sample_tokens, prompt=args.prompt, parallel=parallel_from_args(args),
        dist_timeout=args.dist_timeout,
    ))
