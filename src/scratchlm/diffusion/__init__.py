"""Diffusion: DDPM training of a small U-Net on the digits, DDIM/DDPM sampling with classifier-free guidance
through CLIP's text encoder, and image-to-image (SDEdit).

    from scratchlm.diffusion import DiffusionModel
    model = DiffusionModel.load("runs/diffusion")     # after `scratchlm diffuse train`
    images = model.sample("a handwritten seven", n=8)

See docs/vision.md.
"""

from scratchlm.diffusion.pipeline import DiffusionModel

__all__ = ["DiffusionModel"]
