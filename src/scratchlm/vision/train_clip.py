"""``scratchlm clip train``: a CLIP trained on the digits, its zero-shot test, and a retrieval picture.

    result = train_clip("runs/clip")      # ~1,400 training digits, captions from TRAIN_TEMPLATES
    result.zero_shot                      # accuracy on the ~360 held-out digits with HELDOUT_TEMPLATES

Zero-shot classification (CLIP section 3.1): each class is the mean of its captions' vectors over the held-out
templates (prompt ensembling), and an image gets the class whose vector is closest. Neither the images nor the
words around the digit were seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from scratchlm.vision.batches import CaptionBatches, fixed_caption_batches
from scratchlm.vision.clip import CLIP, CLIPConfig
from scratchlm.vision.digits import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, DigitSet, caption, digits_split
from scratchlm.vision.runs import run_training, settle_options

# The defaults `scratchlm clip train` runs with (measured in benchmarks/vision.py).
DEFAULTS = {"max_steps": 1000, "batch_size": 64, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 50,
            "weight_decay": 0.01, "beta2": 0.999, "grad_clip": 1.0, "eval_interval": 200, "seed": 0,
            **CLIPConfig().to_dict()}


@dataclass
class CLIPRun:
    """What ``train_clip`` returns: the model, the zero-shot accuracies and the training result."""

    model: CLIP
    zero_shot: float  # held-out images, held-out templates, ensembled
    per_template: dict[str, float]  # held-out images, each held-out template alone
    seen_templates: float  # held-out images, the training templates, ensembled
    train_result: object
    out: Path


def zero_shot_accuracy(model: CLIP, data: DigitSet, templates: tuple[str, ...]) -> float:
    """Share of ``data`` classified right from captions of ``templates`` alone (ensembled over them)."""
    captions = [[caption(d, t) for t in templates] for d in range(10)]
    return float((model.classify(data.images, captions) == data.labels).float().mean())


def train_clip(out: str | Path, *, resume: bool = False, force: bool = False, progress: bool = True,
               pictures: bool = True, **given) -> CLIPRun:
    """Train (or resume) a CLIP in ``out``; ``given`` overrides ``DEFAULTS`` (``max_steps=...``, ``lr=...``).
    ``pictures``: draw ``loss.png`` and ``retrieval.png``."""
    out = Path(out)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown options {unknown}; known: {sorted(DEFAULTS)}")
    options = settle_options(out, "clip train", DEFAULTS, given, resume, force)
    config = CLIPConfig(**{k: options[k] for k in CLIPConfig().to_dict()})
    train_set, test_set = digits_split()
    torch.manual_seed(options["seed"])
    model = CLIP(config)
    batches = CaptionBatches(train_set, TRAIN_TEMPLATES, options["batch_size"], config.context_length,
                             options["seed"])
    val = fixed_caption_batches(test_set, TRAIN_TEMPLATES, 256, config.context_length)

    def loss_fn(forward, images, text_ids):
        return forward(images, text_ids)

    def evaluate_fn(model, val_batches):
        with torch.no_grad():
            losses = [model(images, ids).item() * len(ids) for images, ids in val_batches]
        return {"val_loss": sum(losses) / sum(len(ids) for _, ids in val_batches),
                "zero_shot_acc": zero_shot_accuracy(model, test_set, HELDOUT_TEMPLATES)}

    result = run_training(model, options, out, batches, val, loss_fn=loss_fn, evaluate_fn=evaluate_fn,
                          save_model=model.save, load_model=model.load_weights, resume=resume, progress=progress,
                          pixels_per_image=config.image_size ** 2, metric="zero_shot_acc",
                          metric_label="zero-shot accuracy (held-out templates)", plot=pictures)
    model.eval()
    model.save(out)
    per_template = {t: zero_shot_accuracy(model, test_set, (t,)) for t in HELDOUT_TEMPLATES}
    run = CLIPRun(model, zero_shot_accuracy(model, test_set, HELDOUT_TEMPLATES), per_template,
                  zero_shot_accuracy(model, test_set, TRAIN_TEMPLATES), result, out)
    if pictures:
        draw_retrieval(model, test_set, out / "retrieval.png")
    return run


def draw_retrieval(model: CLIP, data: DigitSet, path: Path, n_images: int = 6, top_k: int = 5,
                   seed: int = 0) -> Path:
    """A picture of both directions: for some images their best captions, for some captions their best images.

    The captions are the held-out templates' (50 of them); the images are ``data`` (the held-out digits)."""
    import os

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    captions = [caption(d, t) for t in HELDOUT_TEMPLATES for d in range(10)]
    text_vectors = model.encode_texts(captions)
    image_vectors = model.encode_images(data.images)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(data.labels), generator=generator)[:n_images]
    queries = [caption(d, HELDOUT_TEMPLATES[i % len(HELDOUT_TEMPLATES)]) for i, d in enumerate((7, 3, 0, 5))]
    query_vectors = model.encode_texts(queries)

    fig = Figure(figsize=(10, 0.95 * (n_images + len(queries)) + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(n_images + len(queries), top_k + 1, width_ratios=[2.6] + [1.0] * top_k,
                            left=0.02, right=0.98, top=0.94, bottom=0.02, hspace=0.15, wspace=0.05)
    fig.suptitle("image -> text (top 3 of 50 unseen captions)        text -> image (top 5 of "
                 f"{len(data.labels)} held-out digits)", fontsize=10)
    for row, index in enumerate(picks.tolist()):
        ax = fig.add_subplot(grid[row, 0])
        ax.imshow(data.images[index].numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        scores = image_vectors[index] @ text_vectors.T  # cosine similarities
        best = scores.topk(3).indices.tolist()
        text = "\n".join(f"{scores[b]:.2f}  {captions[b]}" for b in best)
        ax = fig.add_subplot(grid[row, 1:])
        ax.text(0.02, 0.5, text, va="center", fontsize=9, family="monospace")
        ax.set_axis_off()
    for q, (query, vector) in enumerate(zip(queries, query_vectors)):
        row = n_images + q
        ax = fig.add_subplot(grid[row, 0])
        ax.text(0.0, 0.5, f'"{query}"', va="center", fontsize=9)
        ax.set_axis_off()
        best = (image_vectors @ vector).topk(top_k).indices
        gap = torch.full((data.images.shape[1], 2), 0.5)  # grey columns between the digits
        strip = torch.cat([torch.cat([data.images[i], gap], dim=1) for i in best.tolist()], dim=1)[:, :-2]
        ax = fig.add_subplot(grid[row, 1:])
        ax.imshow(strip.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
