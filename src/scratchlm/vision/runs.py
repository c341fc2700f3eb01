"""A vision training run on the shared loop: run directory, recorded options, resume, progress bar, plot.

``scratchlm clip train`` and ``scratchlm diffuse train`` both go through ``run_training``:

    OUT/run.json        the options (``--resume`` reads them back; only ``max_steps`` and ``eval_interval`` may change)
    OUT/last/, best/    checkpoints of the training loop (model files, optimizer, RNG and data position)
    OUT/metrics.jsonl   one record per step and per evaluation; OUT/loss.png the curves
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from scratchlm.errors import TrainingError
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.loop import TrainConfig, TrainResult, train
from scratchlm.train.record import RUN_FILE, describe_changes, merge_given, read_record, write_record
from scratchlm.train.report import TrainingReport, centered_mean, read_metrics

CHANGEABLE = ("max_steps", "eval_interval")
TRAIN_FIELDS = ("max_steps", "batch_size", "lr", "min_lr", "warmup_steps", "weight_decay", "beta2", "grad_clip",
                "eval_interval", "seed")


def settle_options(out: Path, command: str, defaults: dict, given: dict, resume: bool, force: bool) -> dict:
    """The run's options: the defaults under the given ones for a new run (OUT emptied), the record's for --resume."""
    if resume:
        record = read_record(out, command)
        if record is None or ckpt.resolve_checkpoint(out / "last") is None:
            raise TrainingError(f"{out} holds no {command} run to resume: start one without --resume")
        options = merge_given(out, command, record["options"], given, CHANGEABLE)
        changes = describe_changes(record["options"], options)
        if changes:
            print(f"resuming with {changes}")
    else:
        if ckpt.resolve_checkpoint(out / "last") is not None and not force:
            raise TrainingError(f"{out} already holds a run: continue it with `scratchlm {command} --out {out} "
                                "--resume`, replace it with --force, or choose another --out")
        for name in ("last", "best", ".last.old", ".best.old"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("metrics.jsonl", "loss.png", RUN_FILE):
            (out / name).unlink(missing_ok=True)
        options = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    TrainConfig(**{k: options[k] for k in TRAIN_FIELDS})  # validates before anything is written
    write_record(out, command, options)
    return options


class VisionReport(TrainingReport):
    """The progress bar in images per second; the evaluation line and a second panel show ``metric``."""

    def __init__(self, out_dir: Path, progress: bool, pixels_per_image: int, metric: str, metric_label: str):
        super().__init__(out_dir, progress=progress, print_fn=None)
        self.pixels_per_image, self.metric, self.metric_label = pixels_per_image, metric, metric_label

    def on_step(self, record: dict) -> None:
        record["images_per_s"] = record["tokens_per_s"] / self.pixels_per_image
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={record['loss']:.4f}, img/s={record['images_per_s']:.0f}", refresh=False)
            self.bar.update(1)

    def on_eval(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        mark = " (best)" if record.get("best") else ""
        extra = f", {self.metric_label} {record[self.metric]:.3f}" if self.metric in record else ""
        self.write(f"step {record['step']}: val loss {record['val_loss']:.4f}{extra}, train loss "
                   f"{record['train_loss']:.4f}{mark}")
        if self.plot and self.out_dir is not None:
            self.draw()

    def on_end(self, result) -> None:
        plot, self.plot = self.plot, False  # the base class would draw the language-model plot
        super().on_end(result)
        self.plot = plot
        if plot and self.out_dir is not None and (self.out_dir / "metrics.jsonl").exists():
            self.draw()

    def draw(self) -> Path:
        """loss.png: the loss (train and validation) and the evaluation metric against steps."""
        import os

        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        records = read_metrics(self.out_dir / "metrics.jsonl")
        steps = [r for r in records if "loss" in r]
        evals = [r for r in records if "val_loss" in r]
        fig = Figure(figsize=(10, 4), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 2, 1)
        losses = [r["loss"] for r in steps]
        ax.plot([r["step"] for r in steps], losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot([r["step"] for r in steps], centered_mean(losses, max(1, len(losses) // 40)), color="tab:blue",
                label="train (smoothed)")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange",
                label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        ax = fig.add_subplot(1, 2, 2)
        points = [(r["step"], r[self.metric]) for r in evals if self.metric in r]
        if points:
            ax.plot(*zip(*points), "o-", color="tab:green")
        ax.set_xlabel("step")
        ax.set_ylabel(self.metric_label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.out_dir / "loss.png"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
        return path


def run_training(model, options: dict, out: Path, batches, val_batches, *, loss_fn: Callable,
                 evaluate_fn: Callable, save_model: Callable[[Path], None], load_model: Callable[[Path], None],
                 resume: bool, progress: bool, pixels_per_image: int, metric: str, metric_label: str,
                 plot: bool = True) -> TrainResult:
    """Train ``model`` through ``scratchlm.train.loop.train`` with the run's options, checkpoints in ``out``
    (``plot``: draw ``loss.png``)."""
    config = TrainConfig(**{k: options[k] for k in TRAIN_FIELDS}, eval_batches=max(1, len(val_batches)))
    reporter = VisionReport(out, progress, pixels_per_image, metric, metric_label)
    reporter.plot = plot
    resume_from = ckpt.resolve_checkpoint(out / "last") if resume else None
    return train(model, config, batches, val_batches, out_dir=out, save_model=save_model, resume_from=resume_from,
                 reporter=reporter, load_model=load_model, loss_fn=loss_fn, evaluate_fn=evaluate_fn)
