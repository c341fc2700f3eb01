"""The encoder-decoder transformer of "Attention Is All You Need" (Vaswani et al. 2017), from model.py's parts.

    source ids -> embedding * sqrt(C) + positions -> n_encoder_layers x Block (bidirectional) -> memory [B, S, C]
    target ids -> embedding * sqrt(C) + positions -> n_decoder_layers x DecoderBlock -> norm -> output -> logits
    DecoderBlock: x + SelfAttention(norm(x)) (causal), x + CrossAttention(norm(x), memory), x + MLP(norm(x))

The encoder's layers are ``scratchlm.model.Block`` with ``causal=False`` (a BERT-style block); the decoder's
reuse ``Attention`` twice (causal self-attention, then cross-attention whose keys and values come from the
encoder's output: the link between the two stacks) and ``MLP``. Norms go before each sublayer by default
(``norm_position="pre"``, which trains without a warm-up trap, Xiong et al. 2020) or after it as in the paper.

Vocabularies are separate (a source and a target tokenizer) or shared (one tokenizer, one embedding matrix for
both sides); the output projection is the target embedding matrix (section 3.4, Press & Wolf 2017).

Parameter names (model.safetensors; an alias of a tied matrix is stored once):

    source_embeddings.weight                    [V_src, C]
    target_embeddings.weight                    [V_tgt, C]   (absent when shared_vocab: = source_embeddings)
    source_positions.weight / target_positions  [max_*_length, C]    (positions="learned" only)
    encoder.{i}.*                               model.Block names (attn_norm, attn.{q,k,v,o}_proj, mlp_norm, mlp.*)
    encoder_norm.*, decoder_norm.*              [C]          (norm_position="pre" only)
    decoder.{i}.attn_norm / attn / cross_norm / cross_attn / mlp_norm / mlp   (cross_* only with cross_attention)
    output.weight                               [V_tgt, C]   (absent: tied to target_embeddings)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from scratchlm.config import MLPS, NORM_POSITIONS, NORMS, ModelConfig
from scratchlm.errors import ConfigError, ContextLengthError
from scratchlm.model import MLP, Attention, AttentionMask, Block, make_norm
from scratchlm.seq2seq.positions import sinusoidal_table

POSITIONS = ("sinusoidal", "learned")


@dataclass(frozen=True)
class Seq2SeqConfig:
    """Hyperparameters of an encoder-decoder transformer and its token ids; validated on construction."""

    source_vocab_size: int
    target_vocab_size: int
    d_model: int = 128
    n_heads: int = 4
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    d_ff: int | None = None  # None: 4 * d_model
    max_source_length: int = 64  # tokens, the source's end-of-sequence included
    max_target_length: int = 64  # decoder positions: the start token plus the generated tokens
    positions: str = "sinusoidal"  # or "learned"
    shared_vocab: bool = False  # one embedding matrix for source and target (then the vocab sizes are equal)
    norm: str = "layernorm"
    mlp: str = "gelu"
    bias: bool = True
    norm_position: str = "pre"
    dropout: float = 0.0
    cross_attention: bool = True  # False: the decoder never sees the source (an ablation: the link matters)
    source_pad_id: int = 0
    pad_id: int = 0  # target padding (fills the rows that finished in batched search)
    bos_id: int = 1  # the decoder's first input
    eos_id: int = 2  # ends a translation

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"invalid seq2seq config: {msg}")

        for name in ("source_vocab_size", "target_vocab_size", "d_model", "n_heads", "n_encoder_layers",
                     "n_decoder_layers", "max_source_length", "max_target_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise bad(f"{name} must be a positive integer, got {value!r}")
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        if self.positions not in POSITIONS:
            raise bad(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.d_model % self.n_heads:
            raise bad(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.positions == "sinusoidal" and self.d_model % 2:
            raise bad(f"sinusoidal positions need an even d_model, got {self.d_model}")
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("norm_position", NORM_POSITIONS)):
            if getattr(self, name) not in allowed:
                raise bad(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.shared_vocab and self.source_vocab_size != self.target_vocab_size:
            raise bad(f"a shared vocabulary needs equal sizes, got {self.source_vocab_size} and "
                      f"{self.target_vocab_size}")
        for name in ("source_pad_id", "pad_id", "bos_id", "eos_id"):
            size = self.source_vocab_size if name == "source_pad_id" else self.target_vocab_size
            if not 0 <= getattr(self, name) < size:
                raise bad(f"{name} {getattr(self, name)} is outside the vocabulary of {size} tokens")
        if not 0.0 <= self.dropout < 1.0:
            raise bad(f"dropout must be in [0, 1), got {self.dropout}")

    def block_config(self, causal: bool, n_layers: int) -> ModelConfig:
        """The ModelConfig that model.py's Block, Attention and MLP read (its vocabulary is not used)."""
        return ModelConfig(vocab_size=1, context_length=max(self.max_source_length, self.max_target_length),
                           d_model=self.d_model, n_layers=n_layers, n_heads=self.n_heads, d_ff=self.d_ff,
                           positions="learned", norm=self.norm, mlp=self.mlp, bias=self.bias, dropout=self.dropout,
                           causal=causal, norm_position=self.norm_position, gelu_approximate="none")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Seq2SeqConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown seq2seq config fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)


class DecoderBlock(nn.Module):
    """A decoder layer: causal self-attention, cross-attention over the encoder's output, MLP (section 3.1)."""

    def __init__(self, config: ModelConfig, cross_attention: bool = True):
        super().__init__()
        self.post_norm = config.norm_position == "post"
        self.attn_norm, self.attn = make_norm(config), Attention(config)
        if cross_attention:
            self.cross_norm, self.cross_attn = make_norm(config), Attention(config)
        self.cross = cross_attention
        self.mlp_norm, self.mlp = make_norm(config), MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, self_mask: AttentionMask,
                memory_mask: AttentionMask) -> torch.Tensor:
        sublayers = [(self.attn_norm, lambda h: self.attn(h, None, None, None, self_mask))]
        if self.cross:
            sublayers.append((self.cross_norm, lambda h: self.cross_attn(h, None, None, None, memory_mask, memory)))
        sublayers.append((self.mlp_norm, self.mlp))
        for norm, f in sublayers:
            x = norm(x + self.dropout(f(x))) if self.post_norm else x + self.dropout(f(norm(x)))
        return x


class Seq2Seq(nn.Module):
    """An encoder-decoder transformer. ``model(source, target_in)`` returns next-token logits [B, T, V_tgt].

    The training loop passes one tensor: ``model(pair)`` with pair [B, 2, W] = source and decoder input stacked
    (see ``data.PairBatches``), so batches stay the ``(inputs, targets)`` of every other model here.
    """

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        c = config.d_model
        self.source_embeddings = nn.Embedding(config.source_vocab_size, c)
        self.target_embeddings = (self.source_embeddings if config.shared_vocab
                                  else nn.Embedding(config.target_vocab_size, c))
        if config.positions == "learned":
            self.source_positions = nn.Embedding(config.max_source_length, c)
            self.target_positions = nn.Embedding(config.max_target_length, c)
        else:
            n = max(config.max_source_length, config.max_target_length)
            self.register_buffer("position_table", sinusoidal_table(n, c), persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(Block(config.block_config(False, config.n_encoder_layers))
                                     for _ in range(config.n_encoder_layers))
        decoder_config = config.block_config(True, config.n_decoder_layers)
        self.decoder = nn.ModuleList(DecoderBlock(decoder_config, config.cross_attention)
                                     for _ in range(config.n_decoder_layers))
        pre = config.norm_position == "pre"
        self.encoder_norm = make_norm(decoder_config) if pre else nn.Identity()
        self.decoder_norm = make_norm(decoder_config) if pre else nn.Identity()
        self.output = nn.Linear(c, config.target_vocab_size, bias=False)
        self.gradient_checkpointing = False  # the training loop sets it; blocks here are small
        self._init_weights()
        self.output.weight = self.target_embeddings.weight

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                # Scaled by sqrt(C) on the way in (section 3.4), so unit-sized like the sinusoids they are added to.
                nn.init.normal_(module.weight, std=self.config.d_model ** -0.5)
        n_residual = 2 * self.config.n_encoder_layers + 3 * self.config.n_decoder_layers
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):  # GPT-2, section 2.3
                nn.init.normal_(p, std=0.02 / math.sqrt(n_residual))

    # ----------------------------------------------------------------------------------------------
    def _embed(self, ids: torch.Tensor, embeddings: nn.Embedding, positions: str, limit: int) -> torch.Tensor:
        T = ids.shape[1]
        if T > limit:
            raise ContextLengthError(f"a {positions} of {T} tokens is longer than the model's {limit} "
                                     f"(max_{positions}_length)")
        x = embeddings(ids) * math.sqrt(self.config.d_model)
        if self.config.positions == "learned":
            x = x + getattr(self, f"{positions}_positions").weight[:T]
        else:
            x = x + self.position_table[:T].to(x.dtype)
        return self.dropout(x)

    def encode(self, source: torch.Tensor) -> tuple[torch.Tensor, AttentionMask]:
        """The encoder's output for source ids [B, S] (padded with source_pad_id): memory [B, S, C], and the mask
        that hides the padding from every query that attends to it."""
        keys = (source != self.config.source_pad_id)[:, None, None, :]  # (B, 1, 1, S)
        mask = AttentionMask(keys, False, source.shape[1])
        x = self._embed(source, self.source_embeddings, "source", self.config.max_source_length)
        for block in self.encoder:
            x = block(x, None, None, None, mask)  # every token sees every real token of its row
        return self.encoder_norm(x), mask

    def decode(self, target_in: torch.Tensor, memory: torch.Tensor, memory_mask: AttentionMask) -> torch.Tensor:
        """Next-token logits [B, T, V_tgt] for the decoder inputs [B, T] (start token first) given the memory."""
        x = self._embed(target_in, self.target_embeddings, "target", self.config.max_target_length)
        causal = AttentionMask(None, True, target_in.shape[1])  # right padding never reaches an earlier token
        for block in self.decoder:
            x = block(x, memory, causal, memory_mask)
        return self.output(self.decoder_norm(x))

    def forward(self, source: torch.Tensor, target_in: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V_tgt] for ``source`` [B, S] and ``target_in`` [B, T], or for one stacked tensor [B, 2, W]."""
        if target_in is None:
            if source.dim() != 3 or source.shape[1] != 2:
                raise ValueError(f"expected source and target ids, or both stacked as [B, 2, W]; got a tensor of "
                                 f"shape {tuple(source.shape)}")
            source, target_in = source[:, 0], source[:, 1]
        memory, mask = self.encode(source)
        return self.decode(target_in, memory, mask)

    # ----------------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Number of distinct parameters (tied matrices count once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def tied_names(self) -> list[str]:
        """The parameter names that are aliases of another one's tensor, so never saved."""
        return ["output.weight"] + (["target_embeddings.weight"] if self.config.shared_vocab else [])

    def state_to_save(self) -> dict[str, torch.Tensor]:
        """The state dict without the aliases of tied matrices (safetensors stores each tensor once)."""
        sd = self.state_dict()
        for name in self.tied_names():
            sd.pop(name, None)
        return sd
