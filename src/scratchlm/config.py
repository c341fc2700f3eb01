"""ModelConfig: one frozen dataclass that describes every architecture scratchlm runs.

GPT-2 and Llama differ in a handful of switches, not in code paths:

| switch          | GPT-2                  | Llama / SmolLM2            |
|-----------------|------------------------|----------------------------|
| ``positions``   | ``"learned"`` table    | ``"rope"`` (rotary)        |
| ``norm``        | ``"layernorm"``        | ``"rmsnorm"``              |
| ``mlp``         | ``"gelu"`` (4x wide)   | ``"swiglu"`` (gated)       |
| ``bias``        | linear layers biased   | no biases                  |
| ``n_kv_heads``  | = ``n_heads``          | fewer (grouped-query attn) |

A BERT encoder (Devlin et al. 2018) is the same stack with four more switches: ``causal=False`` (every token
sees every other), ``norm_position="post"`` (LayerNorm after each residual add, and once on the embeddings),
``type_vocab_size=2`` (segment embeddings added to the input) and ``gelu_approximate="none"`` (exact erf GELU).

Presets are plain data and cite the upstream ``config.json`` they mirror.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from scratchlm.errors import ConfigError

POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
NORM_POSITIONS = ("pre", "post")
GELU_APPROXIMATIONS = ("tanh", "none")  # the ``approximate`` argument of torch.nn.functional.gelu


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a transformer (a decoder, or a BERT-style encoder); validated on construction."""

    vocab_size: int
    context_length: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None means n_heads (plain multi-head attention)
    d_ff: int | None = None  # None means 4 * d_model (gelu) or Llama's 8/3 rule rounded to 256 (swiglu)
    # None means d_model // n_heads. Set apart from it only when heads were removed (scratchlm.compress's
    # structured pruning): the heads keep their width, so n_heads * head_dim < d_model (HF Llama's head_dim).
    head_dim: int | None = None
    positions: str = "rope"
    norm: str = "rmsnorm"
    mlp: str = "swiglu"
    bias: bool = False  # biases in the attention and MLP linear layers
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True  # the LM head reuses the token embedding matrix
    dropout: float = 0.0
    causal: bool = True  # False: bidirectional attention (encoders)
    norm_position: str = "pre"  # "post": BERT's x = norm(x + f(x)), plus a norm on the embeddings, no final norm
    type_vocab_size: int = 0  # > 0: token-type (segment) embeddings, BERT's sentence A / B
    gelu_approximate: str = "tanh"  # GPT-2's gelu_new is "tanh"; BERT's gelu is exact, "none"
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"invalid model config: {msg}")

        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", _default_d_ff(self.d_model, self.mlp))
        if self.positions not in POSITIONS:
            raise bad(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.norm not in NORMS:
            raise bad(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.mlp not in MLPS:
            raise bad(f"mlp must be one of {MLPS}, got {self.mlp!r}")
        if self.norm_position not in NORM_POSITIONS:
            raise bad(f"norm_position must be one of {NORM_POSITIONS}, got {self.norm_position!r}")
        if self.gelu_approximate not in GELU_APPROXIMATIONS:
            raise bad(f"gelu_approximate must be one of {GELU_APPROXIMATIONS}, got {self.gelu_approximate!r}")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise bad(f"type_vocab_size must be a non-negative integer, got {self.type_vocab_size!r}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise bad(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        elif not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise bad(f"head_dim must be a positive integer, got {self.head_dim!r}")
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise bad(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.positions == "rope" and self.head_dim % 2:
            raise bad(f"rotary positions need an even head size, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise bad(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise bad("norm_eps and rope_theta must be positive")

    @property
    def default_head_dim(self) -> bool:
        """Whether the heads tile d_model (head_dim == d_model / n_heads), as in every unpruned model."""
        return self.head_dim * self.n_heads == self.d_model

    def to_dict(self) -> dict:
        """A JSON-ready dict; ``ModelConfig.from_dict`` reads it back. ``head_dim`` appears only when it is not
        d_model / n_heads, so that the files of unpruned models stay as they were."""
        data = dataclasses.asdict(self)
        if self.default_head_dim:
            del data["head_dim"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again). A head_dim that followed from d_model / n_heads
        follows them again when they change."""
        if "head_dim" not in changes and {"d_model", "n_heads"} & set(changes) and self.default_head_dim:
            changes["head_dim"] = None
        return dataclasses.replace(self, **changes)


def _default_d_ff(d_model: int, mlp: str) -> int:
    if mlp == "gelu":
        return 4 * d_model
    # Llama: two thirds of 4 * d_model (the gate makes SwiGLU 1.5x the work), rounded up to 256.
    hidden = int(2 * 4 * d_model / 3)
    return 256 * ((hidden + 255) // 256)


PRESETS: dict[str, ModelConfig] = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct) config.json: LlamaForCausalLM, hidden_size 576,
    # intermediate_size 1536, 30 layers, 9 heads, 3 KV heads, rope_theta 100000, rms_norm_eps 1e-5,
    # tie_word_embeddings true, vocab 49152, max_position_embeddings 8192.
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, context_length=8192, d_model=576, n_layers=30, n_heads=9,
        n_kv_heads=3, d_ff=1536, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False,
        norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True,
    ),
    # openai-community/gpt2 config.json: n_embd 768, n_layer 12, n_head 12, n_positions 1024,
    # vocab 50257, layer_norm_epsilon 1e-5, activation gelu_new (tanh approximation), tied head.
    "gpt2-124m": ModelConfig(
        name="gpt2-124m", vocab_size=50257, context_length=1024, d_model=768, n_layers=12, n_heads=12,
        positions="learned", norm="layernorm", mlp="gelu", bias=True, norm_eps=1e-5, tie_embeddings=True,
    ),
    # sentence-transformers/all-MiniLM-L6-v2 config.json: BertModel, hidden_size 384, 6 layers, 12 heads,
    # intermediate_size 1536, hidden_act gelu (exact), layer_norm_eps 1e-12, max_position_embeddings 512,
    # type_vocab_size 2, vocab 30522. No LM head: the tied head is a placeholder (encoders use hidden states).
    "all-minilm-l6": ModelConfig(
        name="all-minilm-l6", vocab_size=30522, context_length=512, d_model=384, n_layers=6, n_heads=12,
        d_ff=1536, positions="learned", norm="layernorm", mlp="gelu", bias=True, norm_eps=1e-12,
        tie_embeddings=True, causal=False, norm_position="post", type_vocab_size=2, gelu_approximate="none",
    ),
    # Sizes for `scratchlm estimate` (docs/explain.md) and for training from scratch; nothing to download.
    # HuggingFaceTB/SmolLM2-360M config.json: hidden 960, intermediate 2560, 32 layers, 15 heads, 5 KV heads,
    # rope_theta 100000, tied, vocab 49152, max_position_embeddings 8192.
    "smollm2-360m": ModelConfig(
        name="smollm2-360m", vocab_size=49152, context_length=8192, d_model=960, n_layers=32, n_heads=15,
        n_kv_heads=5, d_ff=2560, rope_theta=100000.0, tie_embeddings=True,
    ),
    # HuggingFaceTB/SmolLM2-1.7B config.json: hidden 2048, intermediate 8192, 24 layers, 32 heads (no GQA),
    # rope_theta 130000, tied, vocab 49152, max_position_embeddings 8192.
    "smollm2-1.7b": ModelConfig(
        name="smollm2-1.7b", vocab_size=49152, context_length=8192, d_model=2048, n_layers=24, n_heads=32,
        d_ff=8192, rope_theta=130000.0, tie_embeddings=True,
    ),
    # openai-community/openai-gpt config.json (Radford et al. 2018): n_embd 768, 12 layers, 12 heads, n_positions
    # 512, vocab 40478, afn "gelu" (exact), LayerNorm after each residual add, tied head. One difference: our
    # post-norm stack also normalises the embeddings (BERT's embed_norm), 1,536 parameters GPT-1 does not have.
    "gpt1-117m": ModelConfig(
        name="gpt1-117m", vocab_size=40478, context_length=512, d_model=768, n_layers=12, n_heads=12,
        positions="learned", norm="layernorm", mlp="gelu", bias=True, norm_eps=1e-5, tie_embeddings=True,
        norm_position="post", gelu_approximate="none",
    ),
    # openai-community/gpt2-medium, -large, -xl config.json: as gpt2 with n_embd/n_layer/n_head 1024/24/16,
    # 1280/36/20 and 1600/48/25.
    **{name: ModelConfig(
        name=name, vocab_size=50257, context_length=1024, d_model=d, n_layers=n, n_heads=h,
        positions="learned", norm="layernorm", mlp="gelu", bias=True, norm_eps=1e-5, tie_embeddings=True,
    ) for name, d, n, h in (("gpt2-355m", 1024, 24, 16), ("gpt2-774m", 1280, 36, 20), ("gpt2-1558m", 1600, 48, 25))},
    # GPT-3 175B (Brown et al. 2020, table 2.1): 96 layers, d_model 12288, 96 heads of 128, context 2048, GPT-2's
    # tokenizer and architecture (its alternating sparse attention layers change no parameter count).
    "gpt3-175b": ModelConfig(
        name="gpt3-175b", vocab_size=50257, context_length=2048, d_model=12288, n_layers=96, n_heads=96,
        positions="learned", norm="layernorm", mlp="gelu", bias=True, norm_eps=1e-5, tie_embeddings=True,
    ),
    # meta-llama/Llama-2-7b-hf config.json: hidden 4096, intermediate 11008, 32 layers, 32 heads, rms_norm_eps
    # 1e-5, rope_theta 10000, untied head, vocab 32000, max_position_embeddings 4096.
    "llama2-7b": ModelConfig(
        name="llama2-7b", vocab_size=32000, context_length=4096, d_model=4096, n_layers=32, n_heads=32,
        d_ff=11008, rope_theta=10000.0, tie_embeddings=False,
    ),
    # meta-llama/Meta-Llama-3-70B config.json: hidden 8192, intermediate 28672, 80 layers, 64 heads, 8 KV heads,
    # rms_norm_eps 1e-5, rope_theta 500000, untied head, vocab 128256, max_position_embeddings 8192.
    "llama3-70b": ModelConfig(
        name="llama3-70b", vocab_size=128256, context_length=8192, d_model=8192, n_layers=80, n_heads=64,
        n_kv_heads=8, d_ff=28672, rope_theta=500000.0, tie_embeddings=False,
    ),
    # Tiny sizes for tests and demos: same switches, a few thousand parameters.
    "tiny-llama": ModelConfig(
        name="tiny-llama", vocab_size=512, context_length=128, d_model=64, n_layers=2, n_heads=4,
        n_kv_heads=2, d_ff=160, positions="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False,
    ),
    "tiny-gpt2": ModelConfig(
        name="tiny-gpt2", vocab_size=512, context_length=128, d_model=64, n_layers=2, n_heads=4,
        positions="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True,
    ),
    "tiny-bert": ModelConfig(
        name="tiny-bert", vocab_size=512, context_length=128, d_model=64, n_layers=2, n_heads=4,
        positions="learned", norm="layernorm", mlp="gelu", bias=True, norm_eps=1e-12, tie_embeddings=True,
        causal=False, norm_position="post", type_vocab_size=2, gelu_approximate="none",
    ),
}


def preset(name: str) -> ModelConfig:
    """The named preset, or a ConfigError that lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
