"""Named training recipes: a tokenizer, a model shape and a training configuration that go together.

``shakespeare-char`` is nanoGPT's CPU configuration for ``train_shakespeare_char`` (its README, "I only
have a macbook"): 4 layers, 4 heads, 128 dimensions, context 64, batch 12, 2,000 iterations, learning
rate 1e-3 decaying to 1e-4 over those iterations, no dropout; the rest from
``config/train_shakespeare_char.py`` (beta2 0.99, 100 warm-up iterations, eval every 250) and nanoGPT's
defaults (AdamW weight decay 0.1, gradient clipping 1.0, no biases, GPT-2 style blocks, tied head).
nanoGPT reaches a validation loss of about 1.88 with it on tiny-shakespeare (see shared/BENCHMARKS.md).

``shakespeare-bpe`` is the same model and schedule on a byte-level BPE vocabulary of 1,024 tokens
trained on the corpus itself: a 64-token window then covers about 200 characters instead of 64, for
about 20% more compute per step (the larger output layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scratchlm.errors import ConfigError
from scratchlm.train.loop import TrainConfig

NANOGPT_CPU_MODEL = dict(
    context_length=64, d_model=128, n_layers=4, n_heads=4, positions="learned", norm="layernorm", mlp="gelu",
    bias=False, tie_embeddings=True, dropout=0.0,
)
NANOGPT_CPU_TRAIN = TrainConfig(
    max_steps=2000, batch_size=12, grad_accum_steps=1, lr=1e-3, min_lr=1e-4, warmup_steps=100, weight_decay=0.1,
    beta1=0.9, beta2=0.99, grad_clip=1.0, eval_interval=250, eval_batches=20,
)
ENDOFTEXT = "<|endoftext|>"


@dataclass(frozen=True)
class Preset:
    """A training recipe. ``model`` holds ModelConfig fields except vocab_size (the tokenizer decides it)."""

    name: str
    description: str
    tokenizer: str  # "char" or "bpe"
    model: dict
    train: TrainConfig
    vocab_size: int | None = None  # BPE vocabulary size, special tokens included
    special_tokens: tuple[str, ...] = ()
    eos_token: str | None = None
    sample_prompt: str = "\n"
    sample_tokens: int = 200
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "shakespeare-char": Preset(
        name="shakespeare-char",
        description="nanoGPT's CPU shakespeare-char: 4x128, context 64, 2,000 steps (~1-2 min on 2 cores)",
        tokenizer="char", model=NANOGPT_CPU_MODEL, train=NANOGPT_CPU_TRAIN,
    ),
    "shakespeare-bpe": Preset(
        name="shakespeare-bpe",
        description="the same model and schedule on a 1,024-token byte-level BPE trained on the corpus",
        tokenizer="bpe", model=NANOGPT_CPU_MODEL, train=NANOGPT_CPU_TRAIN, vocab_size=1024,
        special_tokens=(ENDOFTEXT,), eos_token=ENDOFTEXT, sample_tokens=80,
    ),
}


def get_preset(name: str) -> Preset:
    """The named preset, or a ConfigError listing the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown training preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]
