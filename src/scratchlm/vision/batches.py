"""Training batches of the vision models, drawn from the digits with resumable randomness.

Batch ``i`` depends only on the seed and ``i`` (its own generator), so a run resumed at step ``i`` sees exactly the
batches it would have seen (``state_dict``/``load_state_dict``, which the training loop saves in checkpoints).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scratchlm.vision.digits import DigitSet, caption, encode_texts


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Each image [B, S, S] moved by up to ``max_shift`` pixels in each direction, the border filled with 0 (no ink).

    Handwriting sits a little off-centre; shifted copies teach the models that position is not the digit."""
    if max_shift == 0:
        return images
    B, S, _ = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    rows = (dy[:, None] + torch.arange(S))[:, :, None].expand(B, S, S)
    cols = (dx[:, None] + torch.arange(S))[:, None, :].expand(B, S, S)
    return padded[torch.arange(B)[:, None, None], rows, cols]


class CaptionBatches:
    """Endless batches of (images [B, 8, 8], caption byte ids [B, T]): random rows, each with a random template."""

    def __init__(self, data: DigitSet, templates: tuple[str, ...], batch_size: int, context_length: int,
                 seed: int, max_shift: int = 0):
        self.data, self.templates = data, templates
        self.batch_size, self.context_length = batch_size, context_length
        self.seed, self.max_shift = seed, max_shift
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
        self.index += 1
        rows = torch.randint(0, len(self.data.labels), (self.batch_size,), generator=generator)
        picks = torch.randint(0, len(self.templates), (self.batch_size,), generator=generator)
        texts = [caption(int(self.data.labels[r]), self.templates[int(t)]) for r, t in zip(rows, picks)]
        ids, _ = encode_texts(texts, self.context_length)
        return random_shift(self.data.images[rows], generator, self.max_shift), ids

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


def fixed_caption_batches(data: DigitSet, templates: tuple[str, ...], batch_size: int, context_length: int,
                          seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every image of ``data`` once, in batches, each with a template chosen by ``seed`` (validation)."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(templates), (len(data.labels),), generator=generator)
    out = []
    for start in range(0, len(data.labels), batch_size):
        stop = min(start + batch_size, len(data.labels))
        texts = [caption(int(data.labels[i]), templates[int(picks[i])]) for i in range(start, stop)]
        out.append((data.images[start:stop], encode_texts(texts, context_length)[0]))
    return out
