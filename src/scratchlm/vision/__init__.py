"""Vision: a small CLIP (a ViT and a byte-level text transformer in one space) trained on scikit-learn's digits.

    from scratchlm.vision import CLIP
    clip = CLIP.load("runs/clip")           # after `scratchlm clip train --out runs/clip`

See docs/vision.md. The diffusion model that CLIP's text encoder conditions is ``scratchlm.diffusion``.
"""

import importlib

# Loaded on first use (PEP 562), so that `scratchlm --help`, which imports vision/cli.py, does not import torch.
_EXPORTS = {"CLIP": "clip", "CLIPConfig": "clip", "clip_loss": "clip"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
