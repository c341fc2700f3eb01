"""Attention weights as PNG heat maps: one image per layer and head, rows are queries, columns are keys.

Drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display needed). Token labels mark
the axes while they stay legible (up to ``MAX_LABELS`` tokens); longer texts show positions only.
"""

from __future__ import annotations

from pathlib import Path

import torch

MAX_LABELS = 48


class HeatmapFigure:
    """One matplotlib figure laid out once for a text's token labels, then redrawn for each head (setting the
    image's data and the title): the layout, not the drawing, is most of the cost of a labelled figure."""

    def __init__(self, labels: list[str]):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        T = len(labels)
        side = min(12.0, 2.5 + 0.18 * T)
        self.fig = Figure(figsize=(side + 1.0, side))
        FigureCanvasAgg(self.fig)
        ax = self.fig.add_subplot()
        self.image = ax.imshow(torch.zeros(T, T).numpy(), cmap="viridis", vmin=0.0, vmax=1.0,
                               interpolation="nearest")
        self.fig.colorbar(self.image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
        self.title = ax.set_title("layer 00, head 00")
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query (attending)")
        if T <= MAX_LABELS:
            ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(T), labels, fontsize=7)
        self.fig.tight_layout()

    def save(self, weights: torch.Tensor, title: str, path: Path) -> None:
        """Draw one head's weights [T, T] under ``title`` and save the PNG at ``path``."""
        self.image.set_data(weights.numpy())
        self.title.set_text(title)
        self.fig.savefig(path, dpi=80)


def save_heatmaps(attention: torch.Tensor, labels: list[str], directory: Path, progress: bool = False,
                  layer_numbers: list[int] | None = None) -> list[Path]:
    """Write ``layer{L}_head{H}.png`` (1-based, zero-padded) for every layer and head of ``attention``
    [layers, heads, T, T] into ``directory``; returns the paths. ``layer_numbers`` names the layers given
    (default 1, 2, ...) when ``attention`` holds only some of the model's layers."""
    from scratchlm.progress import bar

    n_layers, n_heads = attention.shape[:2]
    figure = HeatmapFigure(labels)
    paths = []
    pairs = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    numbers = layer_numbers or list(range(1, n_layers + 1))
    for layer, head in bar(pairs, "heat maps", progress, unit="map"):
        n = numbers[layer]
        path = Path(directory) / f"layer{n:02d}_head{head + 1:02d}.png"
        figure.save(attention[layer, head], f"layer {n}, head {head + 1}", path)
        paths.append(path)
    return paths
