"""A small CLIP (Radford et al. 2021): images and captions mapped into one space by contrastive learning.

    from scratchlm.vision import CLIP
    clip = CLIP.load("runs/clip")                      # after `scratchlm clip train --out runs/clip`
    image_vectors = clip.encode_images(load_digits().images[:5] / 16)   # [5, 64], unit length
    text_vectors = clip.encode_texts(["a handwritten seven", "the digit 3"])
    similarity = image_vectors @ text_vectors.T       # cosine similarities
    clip.classify(images, [f"a drawing of {w}" for w in NUMBER_WORDS])   # zero-shot: the best caption's index

Two encoders, one space:

    image [B, 8, 8] -> VisionTransformer -> [CLS] state -> linear projection -> / length -> u  [B, E]
    text  bytes     -> Transformer (causal=False) -> mean over real bytes -> linear -> / length -> v  [B, E]

Training pulls each image towards its own caption and away from the other captions of the batch, and each caption
towards its image: the symmetric InfoNCE loss (CLIP's figure 3 pseudocode)

    logits = exp(t) * u @ v.T               # [B, B]; the diagonal holds the true pairs
    loss   = (cross_entropy(logits, arange(B)) + cross_entropy(logits.T, arange(B))) / 2

with the temperature learned as ``t`` (a log scale, started at log(1/0.07) and kept at most log(100), as CLIP).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config import ModelConfig
from scratchlm.encoder import pool
from scratchlm.errors import ConfigError, ModelFileError
from scratchlm.files import atomic_write_bytes, atomic_write_json, read_json
from scratchlm.model import Transformer
from scratchlm.vision.digits import IMAGE_SIZE, TEXT_VOCAB_SIZE, check_images, encode_texts
from scratchlm.vision.vit import VisionTransformer

CONFIG_FILE = "clip_config.json"
WEIGHTS_FILE = "model.safetensors"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned temperature so that logits stay below 100


@dataclass(frozen=True)
class CLIPConfig:
    """Sizes of both encoders and of the shared space; validated on construction."""

    image_size: int = IMAGE_SIZE
    patch_size: int = 2
    vision_d_model: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_d_model: int = 64
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 64  # bytes of text
    embed_dim: int = 64  # the shared space

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"invalid CLIP config: {name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"invalid CLIP config: patch_size {self.patch_size} must divide image_size "
                              f"{self.image_size}")
        for width, heads in ((self.vision_d_model, self.vision_heads), (self.text_d_model, self.text_heads)):
            if width % heads:
                raise ConfigError(f"invalid CLIP config: a width of {width} cannot be split into {heads} heads")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CLIPConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelFileError(f"unknown CLIP config fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def text_config(self) -> ModelConfig:
        """The text encoder: our Transformer, bidirectional and pre-norm, over bytes."""
        return ModelConfig(vocab_size=TEXT_VOCAB_SIZE, context_length=self.context_length, d_model=self.text_d_model,
                           n_layers=self.text_layers, n_heads=self.text_heads, positions="learned",
                           norm="layernorm", mlp="gelu", bias=True, causal=False, gelu_approximate="none",
                           tie_embeddings=True, name="clip-text")


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching pairs (row i of each is a pair), both [B, E] of unit length."""
    logits = logit_scale.exp() * image_embeds @ text_embeds.T  # (B, B): image i against caption j
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class CLIP(nn.Module):
    """The two encoders, their projections into the shared space and the learned temperature."""

    def __init__(self, config: CLIPConfig | None = None):
        super().__init__()
        self.config = config or CLIPConfig()
        c = self.config
        self.vision = VisionTransformer(c.image_size, c.patch_size, c.vision_d_model, c.vision_layers, c.vision_heads)
        self.text = Transformer(c.text_config())
        self.image_projection = nn.Linear(c.vision_d_model, c.embed_dim, bias=False)
        self.text_projection = nn.Linear(c.text_d_model, c.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.gradient_checkpointing = False  # set by the training loop; the encoders are too small to need it

    # ---- the two towers ----------------------------------------------------------------------------
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit vectors [B, E] of images [B, S, S] (no checks: ``encode_images`` is the public door)."""
        return F.normalize(self.image_projection(self.vision(images)), dim=-1)

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unit vectors [B, E] of byte ids [B, T] with their mask of real bytes."""
        hidden = self.text.hidden_states(ids, padding_mask=mask)  # (B, T, C)
        return F.normalize(self.text_projection(pool(hidden, mask, "mean", normalize=False)), dim=-1)

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """The contrastive loss of a batch of images [B, S, S] and their captions' byte ids [B, T] (0 = padding)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return clip_loss(self.image_features(images), self.text_features(text_ids, text_ids != 0), self.logit_scale)

    # ---- the public API --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        """Unit vectors [N, E] of images: an array [N, 8, 8] of floats in [0, 1] (``load_digits().images / 16``)."""
        images = check_images(images, self.config.image_size)
        was_training = self.training
        self.eval()
        out = torch.cat([self.image_features(chunk) for chunk in images.split(512)]) if len(images) else \
            torch.empty(0, self.config.embed_dim)
        self.train(was_training)
        return out

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit vectors [N, E] of texts (each at most ``context_length`` bytes of UTF-8)."""
        ids, mask = encode_texts(list(texts) if not isinstance(texts, str) else texts, self.config.context_length)
        was_training = self.training
        self.eval()
        out = self.text_features(ids, mask)
        self.train(was_training)
        return out

    def classify(self, images, captions: list[str] | list[list[str]]) -> torch.Tensor:
        """Zero-shot classification: for each image, the index of the most similar caption [N].

        ``captions`` holds one caption per class, or a list of captions per class, whose unit vectors are
        averaged (CLIP's prompt ensembling, section 3.1.4)."""
        if captions and isinstance(captions[0], str):
            captions = [[c] for c in captions]
        classes = torch.stack([F.normalize(self.encode_texts(group).mean(0), dim=-1) for group in captions])
        return (self.encode_images(images) @ classes.T).argmax(dim=1)

    # ---- files -----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write ``clip_config.json`` and ``model.safetensors`` (atomically) into ``directory``."""
        from safetensors.torch import save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items() if k != "text.lm_head.weight"}
        atomic_write_bytes(directory / WEIGHTS_FILE, save(state, metadata={"format": "scratchlm-clip"}))
        atomic_write_json(directory / CONFIG_FILE, self.config.to_dict())

    def load_weights(self, directory: str | Path) -> None:
        """Read ``model.safetensors`` of ``directory`` into this model (names and shapes checked)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(directory) / WEIGHTS_FILE
        try:
            state = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise ModelFileError(f"cannot read {path} ({exc}); the CLIP model is missing or corrupt") from None
        state["text.lm_head.weight"] = state.get("text.tok_embeddings.weight")  # tied: saved once
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items() if v is not None}
        if expected != got:
            wrong = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
            raise ModelFileError(f"{path} does not fit its {CONFIG_FILE} (tensors {wrong[:4]} differ)")
        self.load_state_dict(state)
        self.text.lm_head.weight = self.text.tok_embeddings.weight

    @classmethod
    def load(cls, directory: str | Path) -> CLIP:
        """The CLIP model saved in ``directory`` (what ``scratchlm clip train --out DIR`` wrote), in eval mode."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise ModelFileError(f"{directory} holds no CLIP model ({CONFIG_FILE} is missing); train one with "
                                 f"`scratchlm clip train --out {directory}`")
        model = cls(CLIPConfig.from_dict(read_json(directory / CONFIG_FILE)))
        model.load_weights(directory)
        return model.eval()
