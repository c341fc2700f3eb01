"""The data of scratchlm's vision models: scikit-learn's handwritten digits, their captions, and text as bytes.

    train, test = digits_split()              # DigitSet(images [N, 8, 8] floats in [0, 1], labels [N])
    caption(7, TRAIN_TEMPLATES[0])            # 'a handwritten seven'
    prompt_digit("a sketch of the number 7")  # 7 (a prompt that names no digit is a one-line error)
    ids, mask = encode_texts(["the digit 7"], 48)

The images are the 1,797 8x8 scans of UCI's optical digits set that scikit-learn ships (``load_digits``, no
download): each pixel counts the ink in a 4x4 block of the original 32x32 bitmap, 0 to 16, so ``images / 16`` is
ink in [0, 1] (1 = black ink; drawn as a light digit on a dark background). The split is fixed and stratified:
the same 20% of each class is held out everywhere (CLIP's zero-shot test, the diffusion model's validation).

Captions come from templates. CLIP trains on ``TRAIN_TEMPLATES`` only; its zero-shot test uses
``HELDOUT_TEMPLATES``, whose words around the digit never appear in training, so the accuracy measures whether the
text encoder found the digit in a sentence it has not seen (CLIP, Radford et al. 2021, section 3.1.4, prompts).

Text is read as UTF-8 bytes (id = byte + 1, 0 is padding): no vocabulary to learn, and no word is unknown.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from scratchlm.errors import ConfigError, ContextLengthError, UnsupportedError

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 8
PAD_ID = 0
TEXT_VOCAB_SIZE = 257  # 256 bytes + padding

# {word} is the digit's name, {numeral} its figure.
TRAIN_TEMPLATES = (
    "a handwritten {word}",
    "the digit {numeral}",
    "a photo of the number {word}",
    "{word}",
    "{numeral}",
    "a scan of a handwritten {numeral}",
    "an image of a {word}",
    "number {numeral}",
    "a blurry {word}",
    "a small picture of the digit {word}",
    "the numeral {numeral}, written by hand",
    "someone wrote a {word}",
)
HELDOUT_TEMPLATES = (
    "a pixelated drawing of {word}",
    "this is the figure {numeral}",
    "an old sketch showing a {word}",
    "my kid drew {numeral} here",
    "{word} in black ink",
)


class DigitSet(NamedTuple):
    """Images [N, 8, 8] float32 in [0, 1] (ink) and their labels [N] (0-9)."""

    images: torch.Tensor
    labels: torch.Tensor


def load_digit_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images [N, 8, 8] in [0, 1] and labels [N], from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UnsupportedError("the digits data comes with scikit-learn: pip install 'scratchlm[vision]' "
                               "(or pip install scikit-learn)") from None
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    return images, torch.tensor(data.target, dtype=torch.long)


def digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[DigitSet, DigitSet]:
    """(train, test): a stratified split, the same ``test_fraction`` of every class held out, fixed by ``seed``."""
    images, labels = load_digit_arrays()
    generator = torch.Generator().manual_seed(seed)
    train_rows, test_rows = [], []
    for digit in range(10):
        rows = (labels == digit).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        n_test = round(len(rows) * test_fraction)
        test_rows.append(rows[:n_test])
        train_rows.append(rows[n_test:])
    train, test = torch.cat(train_rows).sort().values, torch.cat(test_rows).sort().values
    return DigitSet(images[train], labels[train]), DigitSet(images[test], labels[test])


def caption(digit: int, template: str) -> str:
    """``template`` filled with the digit's name and figure."""
    return template.format(word=NUMBER_WORDS[digit], numeral=str(digit))


# A digit named in a prompt: a number word or a lone figure (not part of a longer number such as 17).
_DIGIT_PATTERN = re.compile(r"(?<![\w.])(" + "|".join(NUMBER_WORDS) + r"|[0-9])(?![\w.]|\.\d)", re.IGNORECASE)


def prompt_digit(prompt: str) -> int:
    """The one digit that ``prompt`` names ("a handwritten seven", "the digit 7"), or a ConfigError.

    The vision models learned from captions of single digits; a prompt without one (or with two different
    ones) asks for something they never saw."""
    found = {m.lower() for m in _DIGIT_PATTERN.findall(prompt)}
    digits = {NUMBER_WORDS.index(f) if f in NUMBER_WORDS else int(f) for f in found}
    if len(digits) != 1:
        what = "names no digit" if not digits else f"names several digits ({', '.join(map(str, sorted(digits)))})"
        raise ConfigError(f"the prompt {prompt!r} {what}; these models know the ten digits: name one, as a word "
                          "or a figure ('a handwritten seven', 'the digit 7')")
    return digits.pop()


def encode_texts(texts: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte ids [N, T] (right-padded with 0) and the mask of real bytes [N, T], T the longest text's length."""
    if isinstance(texts, str):
        raise ConfigError("encode_texts takes a list of strings, not one string: wrap it in a list")
    encoded = [list(t.encode("utf-8")) for t in texts]
    if not encoded:
        raise ConfigError("no texts to encode: give at least one")
    longest = max(len(e) for e in encoded)
    if longest > context_length:
        raise ContextLengthError(f"a text of {longest} bytes is longer than the text encoder's context of "
                                 f"{context_length} bytes; shorten it")
    width = max(longest, 1)
    ids = torch.full((len(encoded), width), PAD_ID, dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = torch.tensor(e, dtype=torch.long) + 1
    mask = ids != PAD_ID
    mask[:, 0] |= ~mask.any(dim=1)  # an empty text keeps one (padding) position, so its mean pool is defined
    return ids, mask


def check_images(images, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``images`` as a float32 tensor [N, size, size] with values in [0, 1], or a one-line ConfigError."""
    tensor = torch.as_tensor(images, dtype=torch.float32)
    if tensor.dim() == 2:
        tensor = tensor[None]
    if tensor.dim() != 3 or tuple(tensor.shape[1:]) != (size, size):
        raise ConfigError(f"images must be an array [N, {size}, {size}] (as load_digits().images / 16), got shape "
                          f"{tuple(tensor.shape)}; resize them to {size}x{size} pixels")
    if tensor.numel() and (not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1):
        raise ConfigError(f"image values must lie in [0, 1] (ink), got [{tensor.min():.3g}, {tensor.max():.3g}]; "
                          "divide load_digits().images by 16")
    return tensor
