"""Diffusion: DDPM training of a small U-Net on the digits, DDIM/DDPM sampling with classifier-free guidance
through CLIP's text encoder, and image-to-image (SDEdit).

    from scratchlm.diffusion import DiffusionModel
    model = DiffusionModel.load("runs/diffusion")     # after `scratchlm diffuse train`
    images = model.sample("a handwritten seven", n=8)

See docs/vision.md.
"""

from scratchlm.lazy import lazy_exports

# Loaded on first use (PEP 562), so that `scratchlm --help`, which imports diffusion/cli.py, does not import torch.
_EXPORTS = {"DiffusionModel": "pipeline"}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
