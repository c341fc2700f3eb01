"""``scratchlm clip train``: train the small CLIP on the digits, report its zero-shot accuracy.

    scratchlm clip train --out runs/clip                  # defaults: 1,000 steps of 64 image-caption pairs
    scratchlm clip train --out runs/clip --resume --max-steps 1500
    scratchlm clip classify runs/clip "a pixelated drawing of {word}"   # zero-shot accuracy with your template
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scratchlm.cli_options import add_progress_flag, show_progress

# flag -> (option, type, help); None defaults mean "the run's default" (train_clip.DEFAULTS).
TRAIN_FLAGS = {
    "--max-steps": ("max_steps", int, "optimizer steps (default 1000)"),
    "--batch-size": ("batch_size", int, "image-caption pairs per step (default 64)"),
    "--lr": ("lr", float, "peak learning rate (default 1e-3)"),
    "--eval-interval": ("eval_interval", int, "evaluate and checkpoint every this many steps (default 200)"),
    "--seed": ("seed", int, "random seed of weights and batches (default 0)"),
}


def add_train_flags(p: argparse.ArgumentParser, flags: dict) -> None:
    for flag, (dest, kind, text) in flags.items():
        p.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    p.add_argument("--resume", action="store_true", help="continue the run in --out (its recorded options)")
    p.add_argument("--force", action="store_true", help="replace a run already in --out")
    add_progress_flag(p)


def given_options(args: argparse.Namespace, flags: dict) -> dict:
    return {dest: getattr(args, dest) for dest, _, _ in flags.values() if getattr(args, dest) is not None}


def register(subparsers) -> None:
    p = subparsers.add_parser("clip", help="a small CLIP (images and captions in one space) trained on digits")
    sub = p.add_subparsers(dest="clip_command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train a CLIP on scikit-learn's digits (a few minutes on a CPU)",
                       description="Train a ViT image encoder and a byte-level text transformer with the symmetric "
                                   "InfoNCE loss on the digits and captions from templates; report the zero-shot "
                                   "accuracy on held-out digits with held-out templates.")
    t.add_argument("--out", required=True, help="directory for the model, checkpoints, curves and retrieval.png")
    add_train_flags(t, TRAIN_FLAGS)
    t.set_defaults(func=cmd_train)
    c = sub.add_parser("classify", help="zero-shot accuracy on the held-out digits with caption templates")
    c.add_argument("model", help="a directory written by `scratchlm clip train`")
    c.add_argument("templates", nargs="+", help="caption templates with {word} (seven) or {numeral} (7)")
    c.set_defaults(func=cmd_classify)


def cmd_train(args: argparse.Namespace) -> None:
    from scratchlm.vision.train_clip import train_clip

    run = train_clip(args.out, resume=args.resume, force=args.force, progress=show_progress(args),
                     **given_options(args, TRAIN_FLAGS))
    out = Path(args.out)
    print(f"zero-shot accuracy on the held-out digits: {run.zero_shot:.3f} with the "
          f"{len(run.per_template)} held-out caption templates (ensembled), {run.seen_templates:.3f} with the "
          "training templates")
    for template, accuracy in run.per_template.items():
        print(f"  {accuracy:.3f}  {template!r}")
    print(f"wrote {out}: the model (clip_config.json, model.safetensors; load it with "
          f"scratchlm.vision.CLIP.load({str(out)!r})), retrieval.png, loss.png, metrics.jsonl, checkpoints last/ "
          "and best/")


def cmd_classify(args: argparse.Namespace) -> None:
    from scratchlm.errors import ConfigError
    from scratchlm.vision.clip import CLIP
    from scratchlm.vision.digits import digits_split
    from scratchlm.vision.train_clip import zero_shot_accuracy

    for template in args.templates:
        if "{word}" not in template and "{numeral}" not in template:
            raise ConfigError(f"template {template!r} has no {{word}} or {{numeral}}: write where the digit goes, "
                              "as 'a drawing of {word}'")
    model = CLIP.load(args.model)
    _, test = digits_split()
    for template in args.templates:
        print(f"{zero_shot_accuracy(model, test, (template,)):.3f}  {template!r}")
    if len(args.templates) > 1:
        print(f"{zero_shot_accuracy(model, test, tuple(args.templates)):.3f}  (all templates, ensembled)")
