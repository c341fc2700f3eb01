"""What every ``scratchlm align`` training command shares with ``finetune``: options, run record, resume, model
set-up (LoRA or full), and the report (metrics, progress, plot).

The training itself is the pre-training loop (``train.loop.train``), as for ``finetune``: the same progress bar,
``metrics.jsonl``, ``best/`` and ``last/`` checkpoints, ``run.json`` and exact ``--resume``. A method gives it its
batches (``align.data``), a ``loss_fn`` and an ``evaluate_fn``; the loss function drops its extra numbers
(rewards, margins, accuracy) into a ``MetricStash``, which the report adds to each step's record.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from scratchlm.errors import ConfigError, TrainingError
from scratchlm.finetune.lora import DEFAULT_TARGETS, LoraSettings, apply_lora, lora_layers, parse_targets
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.record import describe_changes, merge_given, read_record, write_record
from scratchlm.train.report import TrainingReport, centered_mean, read_metrics
from scratchlm.train.sources import fingerprint_sources

METHODS = ("lora", "full")
# Options left out (None) take these in a new run; a command adds its own (beta, loss, lr).
DEFAULTS = dict(method="lora", rank=8, alpha=16.0, dropout=0.0, targets=DEFAULT_TARGETS, batch_size=8,
                grad_accum_steps=1, weight_decay=0.0, too_long="truncate", val_fraction=0.1, dtype="float32",
                activation_checkpointing=False, seed=0)
CHANGEABLE = ("max_steps", "epochs", "eval_interval")


@dataclass
class AlignOptions:
    """Everything an ``align`` training command can be told: ``finetune``'s options (same names, same meaning)
    and the method's own. None means "not given": the command's default for a new run, the recorded value
    (``OUT/run.json``) with ``resume=True``, which needs only ``out``."""

    model: str | None = None
    data: str | Path | None = None  # preference JSONL
    out: str | Path | None = None
    method: str | None = None  # lora (default) or full
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    targets: str | tuple[str, ...] | None = None
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None  # preference pairs per micro-step
    grad_accum_steps: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float | None = None
    max_length: int | None = None
    too_long: str | None = None
    val_data: str | Path | None = None
    val_fraction: float | None = None
    eval_interval: int | None = None
    dtype: str | None = None
    activation_checkpointing: bool | None = None
    seed: int | None = None
    beta: float | None = None  # DPO/IPO: strength of the pull towards the reference
    loss: str | None = None  # DPO: "sigmoid" (DPO) or "ipo"
    resume: bool = False
    force: bool = False
    progress: bool = True


OPTION_NAMES = tuple(f.name for f in fields(AlignOptions) if f.name not in ("out", "resume", "force", "progress"))


def settle_options(opts: AlignOptions, command: str, defaults: dict, say) -> tuple[dict, Path | None]:
    """The options of this run, resolved, and the checkpoint to resume from (None for a new run).

    A new run takes ``defaults`` for what was not given; ``--resume`` takes the record in ``OUT/run.json`` and
    refuses changed options other than ``CHANGEABLE`` and changed data files (as ``finetune`` does)."""
    if opts.out is None:
        raise ConfigError("give --out, the directory for the run's checkpoints and curves")
    out = Path(opts.out)
    from scratchlm.finetune.run import given_options

    given = given_options(opts, OPTION_NAMES)
    if given["epochs"] is not None and given["max_steps"] is not None:
        raise ConfigError("give --epochs or --max-steps, not both")
    if not opts.resume:
        if given["model"] is None or given["data"] is None:
            raise ConfigError("give the base model and --data (only --resume takes them from the run's run.json)")
        o = {**given, **{k: v for k, v in defaults.items() if given.get(k) is None}}
        o["targets"] = list(parse_targets(o["targets"]))
        return _check(o), None
    existing = ckpt.resolve_checkpoint(out / "last")
    if existing is None:
        raise TrainingError(f"no checkpoint to resume from in {out / 'last'}: run `scratchlm align {command}` "
                            "without --resume first")
    record = read_record(out, f"align {command}")
    if record is None:
        raise TrainingError(f"{out} has a checkpoint but no run.json: start a new run with --force or another --out")
    recorded = record["options"]
    if given["epochs"] is not None:
        given, recorded = {**given, "max_steps": None}, {**recorded, "max_steps": None}
    elif given["max_steps"] is not None:
        recorded = {**recorded, "epochs": None}
    o = merge_given(out, f"align {command}", recorded, given, CHANGEABLE)
    for name, digest in record.get("data_sha256", {}).items():
        path = Path(o[name])
        now = fingerprint_sources(path)[0]["sha256"] if path.is_file() else None
        if now != digest:
            raise TrainingError(f"{path} is {'missing' if now is None else 'not the file'} this run started with: "
                                "put the original back, or start a new run with --force or another --out")
    step = ckpt.read_trainer_state(existing)["step"]
    changes = describe_changes(record["options"], o)
    say(f"resuming {out} from {existing} at step {step}" + (f"; changed: {changes}" if changes else ""))
    return _check(o), existing


def _check(o: dict) -> dict:
    if o["method"] not in METHODS:
        raise ConfigError(f"unknown method {o['method']!r}; choose one of {', '.join(METHODS)}")
    if o["epochs"] is not None and o["epochs"] <= 0:
        raise ConfigError(f"--epochs must be positive, got {o['epochs']}")
    if o["method"] == "lora":
        LoraSettings(o["rank"], o["alpha"], o["dropout"])
    return o


def clear_run_dir(out: Path, force: bool, command: str) -> None:
    """Make ``out`` ready for a new run; refuses to replace a run's checkpoints without ``force``."""
    from scratchlm.train.run import clear_out_dir

    existing = ckpt.resolve_checkpoint(out / "last")
    if existing is not None and not force:
        step = ckpt.read_trainer_state(existing).get("step")
        raise TrainingError(f"{out} already holds a run (checkpoint at step {step}): continue it with "
                            f"`scratchlm align {command} --out {out} --resume`, replace it by adding --force, or "
                            "write the new run elsewhere with --out ANOTHER_DIR")
    clear_out_dir(out, True, "alignment")
    (out / "reference_logps.safetensors").unlink(missing_ok=True)  # DPO's cache belongs to the old run
    out.mkdir(parents=True, exist_ok=True)


def data_fingerprints(o: dict) -> dict:
    return {name: fingerprint_sources(o[name])[0]["sha256"] for name in ("data", "val_data") if o[name] is not None}


def record_run(out: Path, command: str, o: dict) -> None:
    """Write ``OUT/run.json`` with every value settled, so that --resume continues this very run."""
    write_record(out, f"align {command}", o, data_sha256=data_fingerprints(o))


def add_lora(model: torch.nn.Module, o: dict) -> tuple[LoraSettings, dict]:
    """LoRA layers on ``model`` (a Transformer) as the options say; returns the settings and the base's fingerprint
    (recorded in the adapter so that it refuses another base)."""
    from scratchlm.finetune.peft import base_fingerprint, check_peft_layout

    check_peft_layout(model.config)
    settings = LoraSettings(o["rank"], o["alpha"], o["dropout"], parse_targets(o["targets"], model.config.mlp))
    fingerprint = base_fingerprint(model)
    apply_lora(model, settings, seed=o["seed"])
    return settings, fingerprint


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Inside, every LoRA layer of ``model`` adds nothing (scaling 0): the model is its frozen base again, the
    reference policy of DPO and PPO without a second copy of the weights (PEFT's ``disable_adapter``)."""
    layers = list(lora_layers(model).values())
    scalings = [layer.scaling for layer in layers]
    for layer in layers:
        layer.scaling = 0.0
    try:
        yield model
    finally:
        for layer, scaling in zip(layers, scalings):
            layer.scaling = scaling


def load_model_and_pairs(o: dict, say):
    """The base model (float weights, for training) and the training and validation preference pairs; settles
    ``o["max_length"]``. Returns ``(llm, train_pairs, val_pairs)``."""
    import time

    from scratchlm.align.data import load_preferences, split_pairs
    from scratchlm.llm import LLM

    start = time.perf_counter()
    llm = LLM.load(o["model"], dequantize=True, compile=False)
    model = llm.model
    say(f"loaded {llm.name} in {time.perf_counter() - start:.1f} s: {model.num_parameters() / 1e6:.1f}M parameters")
    max_length = o["max_length"] or min(model.config.context_length, 1024)
    if max_length > model.config.context_length + 1:
        raise ConfigError(f"--max-length {max_length} exceeds the model's context of {model.config.context_length}")
    o["max_length"] = max_length
    pairs, stats = load_preferences(o["data"], llm.template, llm.tokenizer, max_length, o["too_long"])
    say(f"data {o['data']}: {stats.describe(max_length)}")
    if o["val_data"] is not None:
        train_pairs = pairs
        val_pairs, val_stats = load_preferences(o["val_data"], llm.template, llm.tokenizer, max_length,
                                                o["too_long"])
        say(f"validation {o['val_data']}: {val_stats.describe(max_length)}")
    else:
        train_pairs, val_pairs = split_pairs(pairs, o["val_fraction"], o["seed"])
    say(f"{len(train_pairs)} training and {len(val_pairs)} validation pairs")
    return llm, train_pairs, val_pairs


def check_data(o: dict) -> None:
    """Every line of the data files checked before the slow model load."""
    from scratchlm.align.data import check_preferences

    for path in (o["data"], o["val_data"]):
        if path is not None:
            check_preferences(path)


# ---- what a person sees --------------------------------------------------------------------------------------
class MetricStash:
    """Numbers a loss function computes beside the loss, averaged over the micro-steps of one optimizer step."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1

    def pop(self) -> dict[str, float]:
        means = {key: total / max(self.count, 1) for key, total in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


class AlignReport(TrainingReport):
    """``TrainingReport`` with the method's metrics in each step record and its own evaluation line and plot."""

    def __init__(self, out_dir: Path, progress: bool, stash: MetricStash, accuracy_key: str = "accuracy"):
        super().__init__(out_dir, progress=progress, print_fn=None)
        self.stash, self.accuracy_key = stash, accuracy_key

    def on_step(self, record: dict) -> None:
        record.update(self.stash.pop())
        super().on_step(record)

    def on_eval(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        shown = ", ".join(f"{k[4:].replace('_', ' ')} {v:.3f}" for k, v in record.items()
                          if k.startswith("val_") and k != "val_loss" and isinstance(v, float))
        mark = " (best)" if record.get("best") else ""
        self.write(f"step {record['step']}: val loss {record['val_loss']:.4f}, {shown}; train loss "
                   f"{record['train_loss']:.4f}{mark}")
        if self.plot and self.out_dir is not None:
            plot_alignment(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png", self.accuracy_key)

    def on_end(self, result) -> None:
        plot, self.plot = self.plot, False  # the base class would draw the cross-entropy plot
        super().on_end(result)
        self.plot = plot
        if plot and self.out_dir is not None and (self.out_dir / "metrics.jsonl").exists():
            plot_alignment(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png", self.accuracy_key)


def plot_alignment(metrics_path: Path, png_path: Path, accuracy_key: str = "accuracy") -> Path:
    """Two panels: the loss (train, smoothed, and validation) and the preference accuracy against steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    fig = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate((("loss", "loss"), (accuracy_key, "preference accuracy"))):
        ax = fig.add_subplot(1, 2, i + 1)
        xs = [r["step"] for r in steps if r.get(key) is not None]
        values = [r[key] for r in steps if r.get(key) is not None]
        if values:
            ax.plot(xs, values, color="tab:blue", alpha=0.25, linewidth=0.8)
            ax.plot(xs, centered_mean(values, max(1, len(values) // 40)), color="tab:blue", label="train (smoothed)")
        val = [(r["step"], r.get(f"val_{key}")) for r in evals if r.get(f"val_{key}") is not None]
        if val:
            ax.plot(*zip(*val), "o-", color="tab:orange", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, png_path)
    return png_path
