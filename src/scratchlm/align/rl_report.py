"""What a person sees during PPO or GRPO: a progress bar with the reward, ``metrics.jsonl`` and ``reward.png``.

    grpo  40%|████      | 20/50 [03:10<04:45, 9.5s/step, reward=0.41, kl=0.52]
    step 20: held-out reward 0.359 (KL 0.48 nats per completion) (best)

``metrics.jsonl`` has one JSON object per step (``step, reward, reward_std, kl, loss, clipfrac, ...``) and one per
evaluation (``step, val_reward, val_kl, val_response_length, val_sample, best``); ``reward.png`` plots the
training reward, the held-out reward and the KL to the reference against steps (redrawn at evaluations at most
once a minute, and at the end).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from scratchlm.train.report import centered_mean, open_metrics, read_metrics

PLOT_EVERY = 60.0  # seconds between redrawing reward.png during a run (it is always drawn at the end)


class RLReport:
    """Receives the RL loop's events (``start``, ``on_step``, ``on_eval``, ``end``)."""

    def __init__(self, out_dir: Path, algorithm: str, max_steps: int, progress: bool = True, say=print):
        self.out_dir, self.algorithm, self.max_steps = Path(out_dir), algorithm, max_steps
        self.progress, self.say = progress, say
        self.bar = None
        self.metrics = None
        self._plotted = time.monotonic()

    def start(self, start_step: int) -> None:
        self.metrics = open_metrics(self.out_dir / "metrics.jsonl", start_step)
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.max_steps, initial=start_step, desc=self.algorithm, unit="step",
                            dynamic_ncols=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            self.say(text)

    def on_step(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.bar is not None:
            kl = f", kl={record['kl']:.3f}" if "kl" in record else ""
            self.bar.set_postfix_str(f"reward={record['reward']:.3f}{kl}", refresh=False)
            self.bar.update(1)
        elif record["step"] % 10 == 0:
            self.say(f"step {record['step']}: reward {record['reward']:.3f}"
                     + (f", KL {record['kl']:.3f}" if "kl" in record else ""))

    def on_eval(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        mark = " (best)" if record.get("best") else ""
        self.write(f"step {record['step']}: held-out reward {record['val_reward']:.3f} (KL {record['val_kl']:.3f} "
                   f"nats per completion, {record['val_response_length']:.0f} tokens){mark}")
        if time.monotonic() - self._plotted > PLOT_EVERY:  # drawing costs ~0.5 s: not at every evaluation
            plot_rewards(self.out_dir / "metrics.jsonl", self.out_dir / "reward.png")
            self._plotted = time.monotonic()

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
            plot_rewards(self.out_dir / "metrics.jsonl", self.out_dir / "reward.png")


def plot_rewards(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Training reward (raw and smoothed), held-out reward, and the KL to the reference, against steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    steps = [r for r in records if "reward" in r]
    evals = [r for r in records if "val_reward" in r]
    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if steps:
        x, y = [r["step"] for r in steps], [r["reward"] for r in steps]
        ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8, label="train reward (per step)")
        ax.plot(x, centered_mean(y, max(1, len(y) // 20)), color="tab:blue", linewidth=1.5,
                label="train reward (smoothed)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_reward"] for r in evals], "o-", color="tab:orange",
                label="held-out reward")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    kl = [r for r in records if "kl" in r or "val_kl" in r]
    if kl:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in kl], [r.get("kl", r.get("val_kl")) for r in kl], color="tab:red", alpha=0.5,
                 linewidth=0.8, label="KL to reference (nats/completion)")
        ax2.set_ylabel("KL to the reference")
        ax2.legend(loc="lower right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, png_path)
    return png_path
