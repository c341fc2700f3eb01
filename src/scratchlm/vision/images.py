"""Grayscale PNGs of digits: written light ink on a black background (the pixel value is the ink), read back.

    save_png(ink[0], "out/0.png")              # ink [S, S] in [0, 1] -> 8-bit grayscale, 255 = full ink
    save_grid(ink, "out/grid.png", columns=8, scale=4)
    ink = read_png("out/0.png", sizes=(8, 16))   # [S, S] in [0, 1]; another size is a one-line error

The polarity follows ``load_digits``: a high value is ink. A picture drawn dark on light must be inverted first
(``invert=True``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from scratchlm.errors import ConfigError, DataError
from scratchlm.files import atomic_write_bytes


def _png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def to_pixels(ink: torch.Tensor) -> np.ndarray:
    """Ink [S, S] in [0, 1] as uint8 pixels (0 black, 255 white = full ink)."""
    return (ink.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def save_png(ink: torch.Tensor, path: str | Path) -> Path:
    """Write one image, ink [S, S] in [0, 1], as an S x S grayscale PNG (atomically)."""
    path = Path(path)
    atomic_write_bytes(path, _png_bytes(to_pixels(ink)))
    return path


def save_grid(ink: torch.Tensor, path: str | Path, columns: int = 8, scale: int = 4, gap: int = 1) -> Path:
    """Write images [N, S, S] as one PNG: a grid of ``columns``, each image enlarged ``scale`` times (nearest)."""
    n, s, _ = ink.shape
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    cell = s * scale + gap
    canvas = np.full((rows * cell + gap, columns * cell + gap), 96, dtype=np.uint8)  # grey lines between cells
    for i in range(n):
        r, c = divmod(i, columns)
        big = np.kron(to_pixels(ink[i]), np.ones((scale, scale), dtype=np.uint8))
        canvas[gap + r * cell: gap + r * cell + s * scale, gap + c * cell: gap + c * cell + s * scale] = big
    path = Path(path)
    atomic_write_bytes(path, _png_bytes(canvas))
    return path


def read_png(path: str | Path, sizes: tuple[int, ...], invert: bool = False) -> torch.Tensor:
    """A grayscale (or colour, averaged) image file as ink [S, S] in [0, 1]; its size must be one of ``sizes``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise DataError(f"no image at {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read {path} as an image ({exc})") from None
    h, w = pixels.shape
    if h != w or h not in sizes:
        accepted = " or ".join(f"{s}x{s}" for s in sizes)
        raise ConfigError(f"{path} is {w}x{h} pixels; the model takes {accepted} grayscale images (light digit on "
                          f"black, as `diffuse sample` writes them): resize it to {sizes[-1]}x{sizes[-1]}")
    ink = torch.from_numpy(pixels.copy())
    return 1 - ink if invert else ink
