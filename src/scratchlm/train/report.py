"""What a person sees while a model trains: a progress bar, samples, ``metrics.jsonl`` and ``loss.png``.

    training  45%|████▌     | 900/2000 [00:25<00:31, 35.1step/s, loss=1.734, tok/s=27.0k]

``metrics.jsonl`` has one JSON object per step (``step, loss, lr, grad_norm, tokens_per_s, step_time``)
and one per evaluation (``step, val_loss, val_ppl, train_loss, best``); ``loss.png`` plots both curves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from scratchlm.sampling import SamplingParams, make_generator, sample_token


class TrainingReport:
    """Receives the training loop's events; writes the metrics file and the plot, draws the progress bar.

    Args:
        out_dir: where metrics.jsonl and loss.png go (None: nothing written).
        progress: show the progress bar (on stderr).
        sample: returns a text sample of the current model, printed at each evaluation.
        plot: write loss.png at each evaluation and at the end.
    """

    def __init__(self, out_dir: str | Path | None, progress: bool = True, sample: Callable[[], str] | None = None,
                 plot: bool = True, print_fn: Callable[[str], None] | None = None):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress, self.sample, self.plot = progress, sample, plot
        self.bar = None
        self.metrics = None
        self._tokens_per_s = None
        self._print = print_fn

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if self._print is not None:
            self._print(text)
        elif self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    # ---- events from the loop ----------------------------------------------------------------------
    def on_start(self, start_step: int, max_steps: int) -> None:
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.metrics = open_metrics(self.out_dir / "metrics.jsonl", start_step)
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True)

    def on_step(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
        rate = record["tokens_per_s"]
        # An exponential moving average keeps the displayed rate steady across noisy steps.
        self._tokens_per_s = rate if self._tokens_per_s is None else 0.9 * self._tokens_per_s + 0.1 * rate
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={record['loss']:.3f}, tok/s={self._tokens_per_s / 1000:.1f}k",
                                     refresh=False)
            self.bar.update(1)

    def on_eval(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        mark = " (best)" if record.get("best") else ""
        self.write(f"step {record['step']}: val loss {record['val_loss']:.4f}, perplexity {record['val_ppl']:.2f}, "
                   f"train loss {record['train_loss']:.4f}{mark}")
        if self.sample is not None:
            text = self.sample()
            self.write("  | " + "\n  | ".join(text.splitlines() or [""]))
        if self.plot and self.out_dir is not None:
            plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")

    def on_end(self, result) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
            if self.plot:
                plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (a line cut short by a crash is skipped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def open_metrics(path: Path, start_step: int):
    """``metrics.jsonl`` opened for appending one JSON line per event. On resume (``start_step`` > 0) the history
    up to the checkpoint is kept and what a killed run logged after it is dropped; that rewrite is atomic, so a
    kill during it loses nothing."""
    from scratchlm.files import atomic_write_bytes

    kept = [r for r in read_metrics(path) if r["step"] <= start_step] if start_step and path.exists() else []
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))
    return open(path, "a", encoding="utf-8")


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Draw training loss (raw and smoothed) and validation loss against steps into a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    smooth = centered_mean(losses, max(1, len(losses) // 40))
    evals = [r for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
    ax.plot(steps, smooth, color="tab:blue", linewidth=1.5, label="train (smoothed)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange",
                label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, png_path)
    return png_path


def centered_mean(values: list[float], half_width: int) -> list[float]:
    """Each value averaged with up to ``half_width`` neighbours on each side (no lag, unlike an EMA)."""
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    out = []
    for i in range(len(values)):
        half = min(half_width, i, len(values) - 1 - i)  # symmetric, so the ends are not pulled inwards
        lo, hi = i - half, i + half + 1
        out.append((sums[hi] - sums[lo]) / (hi - lo))
    return out


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
                top_k: int | None = 200, seed: int = 0) -> str:
    """Continue ``prompt`` with a sliding window, so a small-context model can write past its context.

    Each token re-reads the last ``context_length`` tokens (nanoGPT's ``generate``): fine for a short
    sample from a small model, and it needs no KV cache. Uses its own seeded generator, so sampling never
    disturbs the training RNG.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [0]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    generator = make_generator(seed)
    out: list[int] = []
    context = model.config.context_length
    for _ in range(max_new_tokens):
        window = torch.tensor([(ids + out)[-context:]], device=device)
        logits = model(window)[0, -1].float().cpu()
        token = sample_token(logits, params, generator)
        if tokenizer.eos_id is not None and token == tokenizer.eos_id:
            break
        out.append(token)
    model.train(was_training)
    return tokenizer.decode(out)
