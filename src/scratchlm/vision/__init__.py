"""Vision: a small CLIP (a ViT and a byte-level text transformer in one space) trained on scikit-learn's digits.

    from scratchlm.vision import CLIP
    clip = CLIP.load("runs/clip")           # after `scratchlm clip train --out runs/clip`

See docs/vision.md. The diffusion model that CLIP's text encoder conditions is ``scratchlm.diffusion``.
"""

from scratchlm.lazy import lazy_exports

# Loaded on first use (PEP 562), so that `scratchlm --help`, which imports vision/cli.py, does not import torch.
_EXPORTS = {"CLIP": "clip", "CLIPConfig": "clip", "clip_loss": "clip"}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
