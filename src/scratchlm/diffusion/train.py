"""``scratchlm diffuse train``: DDPM training of the U-Net on the digits, conditioned on CLIP text embeddings.

One training step (DDPM algorithm 1, with classifier-free guidance's caption dropout):

    x0    <- a batch of digits, 8x8 upsampled to 16x16, scaled to [-1, 1]; each with a random caption
    t     <- uniform in 0 .. T-1;  eps <- N(0, I)
    x_t   <- sqrt(abar_t) x0 + sqrt(1 - abar_t) eps           (the closed form, schedule.q_sample)
    loss  <- mean (eps - eps_theta(x_t, t, CLIP(caption) or "no caption" for 10% of rows))^2

The captions' CLIP vectors are computed once (the CLIP stays frozen). Each evaluation measures the held-out
denoising loss and the share of guided samples in which a separate judge (``quality.DigitJudge``) reads the
requested digit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from scratchlm.diffusion import sampling
from scratchlm.diffusion.pipeline import DiffusionModel, load_unet_weights, save_unet, to_model_space
from scratchlm.diffusion.quality import DigitJudge
from scratchlm.diffusion.schedule import NoiseSchedule
from scratchlm.diffusion.unet import UNet, UNetConfig
from scratchlm.errors import ConfigError
from scratchlm.vision.clip import CLIP
from scratchlm.vision.digits import TRAIN_TEMPLATES, DigitSet, caption, digits_split
from scratchlm.vision.runs import run_training, settle_options

DEFAULTS = {"max_steps": 2000, "batch_size": 64, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 100,
            "weight_decay": 0.0, "beta2": 0.999, "grad_clip": 1.0, "eval_interval": 500, "seed": 0,
            "image_size": 16, "channels": 32, "schedule": "cosine", "num_steps": 1000, "uncond_prob": 0.1,
            "clip": None}


@dataclass
class DiffusionRun:
    """What ``train_diffusion`` returns: the model, the judge's reading of guided samples, the training result."""

    model: DiffusionModel
    guided_accuracy: float  # share of guided samples the judge reads as the requested digit
    judge_accuracy: float  # the judge's own accuracy on the real held-out digits
    train_result: object
    out: Path


def caption_vectors(clip: CLIP, templates: tuple[str, ...] = TRAIN_TEMPLATES) -> torch.Tensor:
    """CLIP text vectors [10, len(templates), E] of every digit's caption under every template."""
    texts = [caption(d, t) for d in range(10) for t in templates]
    return clip.encode_texts(texts).view(10, len(templates), -1)


class DiffusionBatches:
    """Endless (x0 [B, 1, S, S], caption vectors [B, E]); batch ``i`` depends only on the seed and ``i``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, vectors: torch.Tensor, batch_size: int, seed: int):
        self.images, self.labels, self.vectors = images, labels, vectors
        self.batch_size, self.seed, self.index = batch_size, seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
        self.index += 1
        rows = torch.randint(0, len(self.labels), (self.batch_size,), generator=generator)
        picks = torch.randint(0, self.vectors.shape[1], (self.batch_size,), generator=generator)
        return self.images[rows], self.vectors[self.labels[rows], picks]

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


def diffusion_loss(unet: UNet, schedule: NoiseSchedule, x0: torch.Tensor, cond: torch.Tensor, uncond_prob: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """DDPM's simple loss (algorithm 1): the mean squared error of the predicted noise, captions dropped at random."""
    t = torch.randint(0, schedule.num_steps, (len(x0),), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    drop = torch.rand(len(x0), generator=generator, device=x0.device) < uncond_prob
    return F.mse_loss(unet(schedule.q_sample(x0, t, noise), t, cond, drop), noise)


def guided_accuracy(unet: UNet, schedule: NoiseSchedule, vectors: torch.Tensor, judge: DigitJudge, per_class: int,
                    steps: int = 50, guidance: float = 3.0, seed: int = 0) -> float:
    """Share of ``per_class`` guided DDIM samples of each digit (first template's caption) that the judge reads
    as that digit."""
    labels = torch.arange(10).repeat_interleave(per_class)
    was_training = unet.training
    unet.eval()
    images = sampling.sample(unet, schedule, vectors[labels, 0], unet.config.image_size, "ddim", steps, guidance,
                             seed)
    unet.train(was_training)
    return judge.accuracy(images, labels)


def train_diffusion(out: str | Path, clip: str | Path | None = None, *, resume: bool = False, force: bool = False,
                    progress: bool = True, eval_samples: int = 10, final_samples: int = 20, pictures: bool = True,
                    **given) -> DiffusionRun:
    """Train (or resume) the diffusion model in ``out``, conditioned on the CLIP in ``clip`` (a directory).

    ``eval_samples``/``final_samples``: guided samples per digit judged at each evaluation / at the end (0: none);
    ``pictures``: draw ``loss.png``."""
    out = Path(out)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown options {unknown}; known: {sorted(DEFAULTS)}")
    if clip is not None:
        given["clip"] = str(Path(clip).resolve())
    elif not resume:
        raise ConfigError("diffuse train needs --clip DIR, a CLIP trained with `scratchlm clip train --out DIR`: "
                          "its text encoder reads the captions")
    options = settle_options(out, "diffuse train", DEFAULTS, given, resume, force)
    clip_model = CLIP.load(options["clip"])
    vectors = caption_vectors(clip_model)
    config = UNetConfig(image_size=options["image_size"], channels=options["channels"],
                        cond_dim=clip_model.config.embed_dim)
    schedule = NoiseSchedule(options["schedule"], options["num_steps"])
    train_set, test_set = digits_split()
    judge = DigitJudge.fit() if eval_samples or final_samples else None
    torch.manual_seed(options["seed"])
    unet = UNet(config)
    batches = DiffusionBatches(to_model_space(train_set.images, config.image_size), train_set.labels, vectors,
                               options["batch_size"], options["seed"])
    val = validation_batches(test_set, vectors, config.image_size)
    uncond = options["uncond_prob"]

    def loss_fn(forward, x0, cond):
        return diffusion_loss(forward, schedule, x0, cond, uncond)

    def evaluate_fn(model, val_batches):
        generator = torch.Generator().manual_seed(0)  # the same noise at every evaluation: comparable losses
        with torch.no_grad():
            losses = [diffusion_loss(model, schedule, x0, cond, 0.0, generator).item() * len(x0)
                      for x0, cond in val_batches]
        metrics = {"val_loss": sum(losses) / sum(len(x0) for x0, _ in val_batches)}
        if eval_samples:
            metrics["guided_acc"] = guided_accuracy(model, schedule, vectors, judge, eval_samples, steps=25)
        return metrics

    def save_model(directory: Path) -> None:
        save_unet(directory, unet, schedule)

    result = run_training(unet, options, out, batches, val, loss_fn=loss_fn, evaluate_fn=evaluate_fn,
                          save_model=save_model, load_model=lambda d: load_unet_weights(unet, d), resume=resume,
                          progress=progress, pixels_per_image=config.image_size ** 2, metric="guided_acc",
                          metric_label="judge reads the requested digit (guided)", plot=pictures)
    model = DiffusionModel(unet, schedule, clip_model)
    model.save(out, clip_dir=options["clip"])
    accuracy = guided_accuracy(unet, schedule, vectors, judge, final_samples) if final_samples else float("nan")
    return DiffusionRun(model, accuracy, judge.accuracy(test_set.images) if judge else float("nan"), result, out)


def validation_batches(data: DigitSet, vectors: torch.Tensor, size: int, batch_size: int = 128):
    """The held-out digits in model space with their first template's caption vector, in batches."""
    images = to_model_space(data.images, size)
    return [(images[i:i + batch_size], vectors[data.labels[i:i + batch_size], 0])
            for i in range(0, len(images), batch_size)]
