"""``scratchlm diffuse train|sample|img2img``: a text-conditioned diffusion model of digits.

    scratchlm clip train --out runs/clip                                  # first: the CLIP that reads prompts
    scratchlm diffuse train --clip runs/clip --out runs/diffusion
    scratchlm diffuse sample runs/diffusion --prompt "a handwritten seven" --n 16 --seed 0 --out samples/
    scratchlm diffuse img2img runs/diffusion --image samples/0.png --prompt "the digit 1" --strength 0.6 --out edits/

``sample`` and ``img2img`` write one grayscale PNG per image (``0.png``, ``1.png``, ...; 16x16, a light digit on a
black background, as ``load_digits`` counts ink) and ``grid.png`` (all of them, enlarged 4 times).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scratchlm.cli_options import add_progress_flag, show_progress
from scratchlm.vision.cli import add_train_flags, given_options

TRAIN_FLAGS = {
    "--max-steps": ("max_steps", int, "optimizer steps (default 2000)"),
    "--batch-size": ("batch_size", int, "images per step (default 64)"),
    "--lr": ("lr", float, "peak learning rate (default 2e-3)"),
    "--channels": ("channels", int, "U-Net width at full resolution (default 32)"),
    "--schedule": ("schedule", str, "noise schedule: cosine (default) or linear"),
    "--eval-interval": ("eval_interval", int, "evaluate and checkpoint every this many steps (default 500)"),
    "--seed": ("seed", int, "random seed of weights, batches and noise (default 0)"),
}


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a directory written by `scratchlm diffuse train`")
    p.add_argument("--prompt", required=True, help="a caption naming one digit ('a handwritten seven', 'the digit 7')")
    p.add_argument("--out", required=True, help="directory for the PNGs (0.png, 1.png, ..., grid.png)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the noise (default 0)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim",
                   help="ddim (deterministic, --steps steps; default) or ddpm (every step of the schedule)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=3.0,
                   help="classifier-free guidance scale (default 3; 1 is plain conditioning, 0 ignores the prompt)")
    add_progress_flag(p)


def register(subparsers) -> None:
    p = subparsers.add_parser("diffuse", help="a diffusion model of digits: train, sample from a prompt, img2img")
    sub = p.add_subparsers(dest="diffuse_command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="DDPM training of a small U-Net, conditioned through a CLIP's text encoder")
    t.add_argument("--clip", default=None, help="a CLIP directory from `scratchlm clip train` (not with --resume)")
    t.add_argument("--out", required=True, help="directory for the model, checkpoints, curves and samples.png")
    add_train_flags(t, TRAIN_FLAGS)
    t.set_defaults(func=cmd_train)
    s = sub.add_parser("sample", help="generate digits from a prompt")
    add_sampling_flags(s)
    s.add_argument("--n", type=int, default=8, help="images to generate (default 8)")
    s.set_defaults(func=cmd_sample)
    i = sub.add_parser("img2img", help="redraw an image towards a prompt (SDEdit)")
    add_sampling_flags(i)
    i.add_argument("--image", required=True, help="a PNG: 8x8 or 16x16 grayscale, light digit on black")
    i.add_argument("--invert", action="store_true", help="the image is a dark digit on a light background")
    i.add_argument("--strength", type=float, default=0.6,
                   help="how much noise to add, 0-1 (default 0.6): low keeps the drawing, high follows the prompt")
    i.add_argument("--n", type=int, default=1, help="variations to generate (default 1)")
    i.set_defaults(func=cmd_img2img)


def cmd_train(args: argparse.Namespace) -> None:
    from scratchlm.diffusion.train import train_diffusion
    from scratchlm.vision.images import save_grid

    run = train_diffusion(args.out, args.clip, resume=args.resume, force=args.force, progress=show_progress(args),
                          **given_options(args, TRAIN_FLAGS))
    out = Path(args.out)
    images = [run.model.sample(f"a handwritten {word}", n=8, seed=0)
              for word in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]
    import torch

    from scratchlm.diffusion.quality import to_ink

    save_grid(to_ink(torch.cat(images), run.model.image_size), out / "samples.png", columns=8)
    print(f"guided samples read as the requested digit by a logistic regression on the real digits: "
          f"{run.guided_accuracy:.3f} (20 per digit, DDIM 50 steps, guidance 3; the judge reads "
          f"{run.judge_accuracy:.3f} of the real held-out digits right)")
    print(f"wrote {out}: the model (diffusion_config.json, model.safetensors, clip/), samples.png (one row per "
          "digit), loss.png, metrics.jsonl, checkpoints last/ and best/")


def write_images(images, out: Path) -> None:
    from scratchlm.diffusion.quality import to_ink
    from scratchlm.vision.images import save_grid, save_png

    out.mkdir(parents=True, exist_ok=True)
    ink = to_ink(images, images.shape[-1])
    for index, image in enumerate(ink):
        save_png(image, out / f"{index}.png")
    save_grid(ink, out / "grid.png")
    names = ", ".join(f"{i}.png" for i in range(min(len(ink), 3))) + (", ..." if len(ink) > 3 else "")
    print(f"wrote {len(ink)} image{'s' if len(ink) != 1 else ''} to {out} ({names}; {ink.shape[-1]}x{ink.shape[-1]} "
          "grayscale, light digit on black) and grid.png")


def _bar(args: argparse.Namespace, total: int):
    if not show_progress(args):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="denoising", unit="step")


def cmd_sample(args: argparse.Namespace) -> None:
    from scratchlm.diffusion.pipeline import DiffusionModel
    from scratchlm.errors import ConfigError

    if args.n < 1 or args.n > 4096:
        raise ConfigError(f"--n must be between 1 and 4096, got {args.n}")
    model = DiffusionModel.load(args.model)
    bar = _bar(args, args.steps if args.sampler == "ddim" else model.schedule.num_steps)
    images = model.sample(args.prompt, n=args.n, seed=args.seed, sampler=args.sampler, steps=args.steps,
                          guidance=args.guidance, progress=bar)
    if bar is not None:
        bar.close()
    write_images(images, Path(args.out))


def cmd_img2img(args: argparse.Namespace) -> None:
    from scratchlm.diffusion.pipeline import DiffusionModel, to_model_space
    from scratchlm.errors import ConfigError
    from scratchlm.vision.digits import IMAGE_SIZE
    from scratchlm.vision.images import read_png

    if args.n < 1 or args.n > 4096:
        raise ConfigError(f"--n must be between 1 and 4096, got {args.n}")
    model = DiffusionModel.load(args.model)
    sizes = tuple(sorted({IMAGE_SIZE, model.image_size}))
    ink = read_png(args.image, sizes, invert=args.invert)
    images = to_model_space(ink[None], model.image_size).expand(args.n, -1, -1, -1)
    bar = _bar(args, max(1, round(args.steps * args.strength)) if args.sampler == "ddim" else
               max(1, round(args.strength * model.schedule.num_steps)))
    edited = model.img2img(images, args.prompt, strength=args.strength, seed=args.seed, sampler=args.sampler,
                           steps=args.steps, guidance=args.guidance, progress=bar)
    if bar is not None:
        bar.close()
    write_images(edited, Path(args.out))
