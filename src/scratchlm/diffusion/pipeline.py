"""A text-to-image diffusion model of digits: the U-Net, its noise schedule, and the CLIP that reads the prompt.

    from scratchlm.diffusion import DiffusionModel
    model = DiffusionModel.load("runs/diffusion")           # after `scratchlm diffuse train`
    images = model.sample("a handwritten seven", n=8, seed=0)          # [8, 1, 16, 16] in [-1, 1]
    edited = model.img2img(images, "the digit 1", strength=0.6)       # SDEdit towards another digit
    to_pil(images[0])                                        # a grayscale PIL image, light ink on black

A directory holds ``diffusion_config.json`` (U-Net sizes, schedule), ``model.safetensors`` (the U-Net) and
``clip/`` (a copy of the CLIP whose text encoder conditions it, so the directory stands alone).
Images in model space are [-1, 1], -1 no ink, +1 full ink; PNGs are light digits on a black background.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from scratchlm.diffusion import sampling
from scratchlm.diffusion.schedule import NoiseSchedule
from scratchlm.diffusion.unet import UNet, UNetConfig
from scratchlm.errors import ConfigError, ModelFileError
from scratchlm.files import atomic_write_bytes, atomic_write_json, read_json
from scratchlm.vision.clip import CLIP
from scratchlm.vision.digits import IMAGE_SIZE, prompt_digit

CONFIG_FILE = "diffusion_config.json"
WEIGHTS_FILE = "model.safetensors"


def to_model_space(ink: torch.Tensor, size: int) -> torch.Tensor:
    """Ink images [N, s, s] in [0, 1] as model inputs [N, 1, size, size] in [-1, 1] (bilinear resize)."""
    x = ink.float()[:, None]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1


class DiffusionModel:
    """``unet`` (noise predictor), ``schedule`` (forward process) and ``clip`` (its text encoder reads prompts)."""

    def __init__(self, unet: UNet, schedule: NoiseSchedule, clip: CLIP):
        self.unet, self.schedule, self.clip = unet.eval(), schedule, clip.eval()

    @property
    def image_size(self) -> int:
        return self.unet.config.image_size

    def condition(self, prompts: list[str]) -> torch.Tensor:
        """CLIP text embeddings [N, E] of ``prompts``; each must name one digit (the only things the model saw)."""
        for prompt in prompts:
            prompt_digit(prompt)
        return self.clip.encode_texts(prompts)

    def sample(self, prompt: str, n: int = 8, seed: int = 0, sampler: str = "ddim", steps: int = 50,
               guidance: float = 3.0, progress=None) -> torch.Tensor:
        """``n`` images [n, 1, S, S] in [-1, 1] of ``prompt``, from seed ``seed``."""
        if n < 1:
            raise ConfigError(f"--n must be at least 1, got {n}")
        cond = self.condition([prompt]).expand(n, -1)
        return sampling.sample(self.unet, self.schedule, cond, self.image_size, sampler, steps, guidance, seed,
                               progress)

    def img2img(self, images: torch.Tensor, prompt: str, strength: float = 0.6, seed: int = 0,
                sampler: str = "ddim", steps: int = 50, guidance: float = 3.0, progress=None) -> torch.Tensor:
        """SDEdit: ``images`` (model space [N, 1, S, S], or ink [N, s, s] in [0, 1]) redrawn towards ``prompt``."""
        if images.dim() == 3:
            images = to_model_space(images, self.image_size)
        if tuple(images.shape[1:]) != (1, self.image_size, self.image_size):
            raise ConfigError(f"images must be [N, 1, {self.image_size}, {self.image_size}], got "
                              f"{tuple(images.shape)}")
        cond = self.condition([prompt]).expand(len(images), -1)
        return sampling.img2img(self.unet, self.schedule, images, cond, strength, sampler, steps, guidance, seed,
                                progress)

    # ---- files -----------------------------------------------------------------------------------
    def save(self, directory: str | Path, clip_dir: str | Path | None = None) -> None:
        """Write the config, the U-Net and (from ``clip_dir``, or this model's CLIP) ``clip/`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_unet(directory, self.unet, self.schedule)
        if clip_dir is not None and Path(clip_dir).resolve() != (directory / "clip").resolve():
            shutil.rmtree(directory / "clip", ignore_errors=True)
            (directory / "clip").mkdir()
            for name in ("clip_config.json", "model.safetensors"):
                shutil.copy2(Path(clip_dir) / name, directory / "clip" / name)
        elif clip_dir is None:
            self.clip.save(directory / "clip")

    @classmethod
    def load(cls, directory: str | Path) -> DiffusionModel:
        """The model that ``scratchlm diffuse train --out DIR`` wrote."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise ModelFileError(f"{directory} holds no diffusion model ({CONFIG_FILE} is missing); train one with "
                                 f"`scratchlm diffuse train --clip CLIP_DIR --out {directory}`")
        unet, schedule = load_unet(directory)
        return cls(unet, schedule, CLIP.load(directory / "clip"))


def save_unet(directory: Path, unet: UNet, schedule: NoiseSchedule) -> None:
    """``diffusion_config.json`` and ``model.safetensors`` (atomic writes)."""
    from safetensors.torch import save

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_FILE, save(state, metadata={"format": "scratchlm-diffusion"}))
    atomic_write_json(directory / CONFIG_FILE, {"unet": unet.config.to_dict(), "schedule": schedule.to_dict(),
                                                "data_size": IMAGE_SIZE})


def load_unet_weights(unet: UNet, directory: Path) -> None:
    """Read ``model.safetensors`` of ``directory`` into ``unet`` (names and shapes checked)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / WEIGHTS_FILE
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"cannot read {path} ({exc}); the diffusion model is missing or corrupt") from None
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    if expected != {k: tuple(v.shape) for k, v in state.items()}:
        raise ModelFileError(f"{path} does not fit its {CONFIG_FILE}: the U-Net's tensors differ")
    unet.load_state_dict(state)


def load_unet(directory: Path) -> tuple[UNet, NoiseSchedule]:
    config = read_json(directory / CONFIG_FILE)
    try:
        unet = UNet(UNetConfig.from_dict(config["unet"]))
        schedule = NoiseSchedule(**config["schedule"])
    except (KeyError, TypeError) as exc:
        raise ModelFileError(f"{directory / CONFIG_FILE} is incomplete ({exc})") from None
    load_unet_weights(unet, directory)
    return unet.eval(), schedule
