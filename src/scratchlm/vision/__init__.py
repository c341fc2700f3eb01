"""Vision: a small CLIP (a ViT and a byte-level text transformer in one space) trained on scikit-learn's digits.

    from scratchlm.vision import CLIP
    clip = CLIP.load("runs/clip")           # after `scratchlm clip train --out runs/clip`

See docs/vision.md. The diffusion model that CLIP's text encoder conditions is ``scratchlm.diffusion``.
"""

from scratchlm.vision.clip import CLIP, CLIPConfig, clip_loss

__all__ = ["CLIP", "CLIPConfig", "clip_loss"]
