"""The vision models with their default settings: training time, CLIP's zero-shot accuracy, and how often a separate
judge reads the requested digit in the diffusion model's samples and image-to-image edits.

    .venv/bin/python benchmarks/vision.py                  # defaults of `clip train` and `diffuse train` (minutes)
    .venv/bin/python benchmarks/vision.py --no-record      # print only, leave RESULTS.md alone

The judge is scikit-learn's LogisticRegression trained on the real digits' training split (``DigitJudge``); its
accuracy on the real held-out digits is printed as the reference. The pictures of docs/vision.md are written to
``--images`` (default docs/images/).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, machine  # noqa: E402

from scratchlm.diffusion.quality import DigitJudge, to_ink  # noqa: E402
from scratchlm.diffusion.train import train_diffusion  # noqa: E402
from scratchlm.vision.digits import NUMBER_WORDS, digits_split  # noqa: E402
from scratchlm.vision.images import save_grid  # noqa: E402
from scratchlm.vision.train_clip import train_clip  # noqa: E402


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def img2img_rates(model, judge: DigitJudge, strengths, per_class: int, seed: int = 0) -> list[dict]:
    """For held-out digits redrawn towards another digit: how often the judge still reads the source digit, and how
    often the prompt's digit, at each strength."""
    _, test = digits_split()
    rows = torch.cat([(test.labels == d).nonzero().flatten()[:per_class] for d in range(10)])
    sources = test.labels[rows]
    targets = (sources + 1 + torch.arange(len(rows)) % 9) % 10  # every other digit, in turn
    out = []
    for strength in strengths:
        edited = []
        for target in range(10):
            chosen = targets == target
            if chosen.any():
                edited.append((chosen, model.img2img(test.images[rows[chosen]], f"a handwritten {NUMBER_WORDS[target]}",
                                                     strength=strength, seed=seed)))
        images = torch.empty(len(rows), 1, model.image_size, model.image_size)
        for chosen, result in edited:
            images[chosen] = result
        read = judge.predict(images)
        out.append({"strength": strength, "keeps": float((read == sources).float().mean()),
                    "follows": float((read == targets).float().mean()), "images": images})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--images", default="docs/images", help="where the docs' pictures go")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.out or tempfile.mkdtemp(prefix="vision-bench-"))
    images_dir = Path(args.images)
    images_dir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    clip_run, clip_wall, clip_cpu = timed(lambda: train_clip(root / "clip", force=True, progress=False))
    print(f"clip train: {clip_wall:.0f} s wall, {clip_cpu:.0f} s CPU; zero-shot {clip_run.zero_shot:.3f} (held-out "
          f"templates), {clip_run.seen_templates:.3f} (training templates)")
    (images_dir / "clip_retrieval.png").write_bytes((root / "clip" / "retrieval.png").read_bytes())
    (images_dir / "clip_loss.png").write_bytes((root / "clip" / "loss.png").read_bytes())

    diff_run, diff_wall, diff_cpu = timed(lambda: train_diffusion(root / "diffusion", root / "clip", force=True,
                                                                  progress=False))
    model = diff_run.model
    judge = DigitJudge.fit()
    labels = torch.arange(10).repeat_interleave(20)
    rows = []
    for sampler, steps, guidance, per_class in (("ddim", 50, 3.0, 20), ("ddim", 50, 1.0, 20), ("ddim", 50, 0.0, 20),
                                                 ("ddpm", 1000, 3.0, 5)):
        chosen = torch.arange(10).repeat_interleave(per_class)

        def draw(sampler=sampler, steps=steps, guidance=guidance, per_class=per_class):
            return torch.cat([model.sample(f"a handwritten {NUMBER_WORDS[d]}", n=per_class, seed=d, sampler=sampler,
                                           steps=steps, guidance=guidance) for d in range(10)])

        images, wall, _ = timed(draw)
        accuracy = judge.accuracy(images, chosen)
        rows.append((sampler, steps, guidance, len(chosen), accuracy, wall / len(chosen)))
        print(f"{sampler} {steps} steps, guidance {guidance}: judge reads the requested digit in {accuracy:.3f} of "
              f"{len(chosen)} samples ({wall / len(chosen):.2f} s per image)")
        if sampler == "ddim" and guidance == 3.0:
            grid = torch.cat([images[labels == d][:8] for d in range(10)])
            save_grid(to_ink(grid), images_dir / "diffusion_samples.png", columns=8)
    (images_dir / "diffusion_loss.png").write_bytes((root / "diffusion" / "loss.png").read_bytes())
    strengths = (0.3, 0.5, 0.7, 0.9)
    edits = img2img_rates(model, judge, strengths, per_class=10)
    for e in edits:
        print(f"img2img strength {e['strength']}: keeps the source digit {e['keeps']:.3f}, follows the prompt "
              f"{e['follows']:.3f}")
    _, test = digits_split()
    sources = torch.cat([(test.labels == d).nonzero().flatten()[:1] for d in range(10)])
    picture = [to_ink(torch.nn.functional.interpolate(test.images[sources][:, None], size=16, mode="bilinear") * 2 - 1)]
    picture += [to_ink(e["images"][::10]) for e in edits]  # the first edit of each source digit
    save_grid(torch.cat(picture), images_dir / "img2img.png", columns=10)
    judge_real = judge.accuracy(test.images)

    table = ["| model | steps | wall | CPU | result |", "|---|---|---|---|---|",
             f"| CLIP (`clip train` defaults) | {clip_run.train_result.step} | {clip_wall:.0f} s | {clip_cpu:.0f} s | "
             f"zero-shot {clip_run.zero_shot:.3f} on {len(test.labels)} held-out digits, held-out templates "
             f"(ensembled); {clip_run.seen_templates:.3f} with the training templates |",
             f"| diffusion (`diffuse train` defaults) | {diff_run.train_result.step} | {diff_wall:.0f} s | "
             f"{diff_cpu:.0f} s | guided DDIM samples read as the requested digit: {diff_run.guided_accuracy:.3f} |"]
    per_template = "\n".join(f"| {t!r} | {a:.3f} |" for t, a in clip_run.per_template.items())
    samples = "\n".join(f"| {s} | {n} | {g} | {k} | {a:.3f} | {w:.2f} |" for s, n, g, k, a, w in rows)
    edits_table = "\n".join(f"| {e['strength']} | {e['keeps']:.3f} | {e['follows']:.3f} |" for e in edits)
    text = f"""## Vision: CLIP and diffusion on the digits, default settings, {started}

{machine()}, load average {load:.1f} at the start, torch {torch.__version__}, {args.threads} threads;
`python benchmarks/vision.py`. Judge: LogisticRegression on the real digits' training split, {judge_real:.3f} on the
real held-out digits.

{chr(10).join(table)}

Zero-shot accuracy by held-out template (each alone):

| template | accuracy |
|---|---|
{per_template}

Samples (one prompt per digit, "a handwritten seven", ...), share read as the requested digit:

| sampler | steps | guidance | samples | judge reads the digit | s per image |
|---|---|---|---|---|---|
{samples}

Image-to-image (SDEdit) of 100 held-out digits towards another digit's prompt:

| strength | keeps the source digit | follows the prompt |
|---|---|---|
{edits_table}
"""
    print(text)
    if not args.no_record:
        append_results(text)


if __name__ == "__main__":
    main()
