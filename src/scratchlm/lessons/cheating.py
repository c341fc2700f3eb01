"""The model that cheats: a toy GPT trained without the causal mask.

A language model is trained on every position of a window at once: position t predicts token t+1. Without the
causal mask, position t's attention can read position t+1 itself, so the easiest way to lower the training loss
is to copy the next token from the input. The loss falls fast, towards 0, and the model learns nothing about
language. At generation time there is no next token to copy (it is the one being generated), and the samples
are nonsense. With the mask (``attention.causal_mask``) position t sees only tokens 0..t and has to learn
to predict.

``honest_loss`` measures what generation sees: each next token predicted from its prefix alone, one forward
pass per prefix, so even a model trained without the mask cannot look ahead. For a causal model it equals the
ordinary loss; for the cheating model it is far higher than its training loss.

``compare_masking`` trains the two twins (same seed, same batches) and reports both losses and a sample of each.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.lessons.attention import SelfAttention


class ToyBlock(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x)), as ``model.Block``."""

    def __init__(self, d_model: int, n_heads: int, causal: bool):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, causal=causal)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class ToyGPT(nn.Module):
    """A small GPT over characters: token and position embeddings, ``n_layers`` blocks, a final norm and a head.
    ``causal=False`` removes the mask from every block: the cheating model."""

    def __init__(self, vocab_size: int, context_length: int, d_model: int = 64, n_heads: int = 4, n_layers: int = 2,
                 causal: bool = True):
        super().__init__()
        self.context_length = context_length
        self.tok_embeddings = nn.Embedding(vocab_size, d_model)
        self.pos_embeddings = nn.Embedding(context_length, d_model)
        self.blocks = nn.ModuleList(ToyBlock(d_model, n_heads, causal) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] for ids [B, T]."""
        T = ids.shape[1]
        x = self.tok_embeddings(ids) + self.pos_embeddings(torch.arange(T, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.final_norm(x))


@dataclass
class CharVocab:
    """One id per distinct character of a text, in sorted order (nanoGPT's shakespeare_char)."""

    chars: list[str]

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls(sorted(set(text)))

    def encode(self, text: str) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index[c] for c in text if c in index], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def random_windows(data: torch.Tensor, batch_size: int, context: int, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``context`` tokens and the same windows shifted by one (the targets)."""
    starts = torch.randint(len(data) - context - 1, (batch_size,), generator=generator)
    x = torch.stack([data[s:s + context] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + context + 1] for s in starts.tolist()])
    return x, y


def train_toy_gpt(data: torch.Tensor, vocab_size: int, causal: bool, steps: int = 300, batch_size: int = 16,
                  context: int = 32, d_model: int = 64, n_heads: int = 4, n_layers: int = 2, lr: float = 3e-3,
                  seed: int = 0) -> tuple[ToyGPT, list[float]]:
    """Train a ``ToyGPT`` on random windows of ``data`` (token ids) with AdamW; returns (model, loss per step).
    Two calls with the same seed see the same initial weights and the same batches, whatever ``causal`` is."""
    torch.manual_seed(seed)
    model = ToyGPT(vocab_size, context, d_model, n_heads, n_layers, causal=causal)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        x, y = random_windows(data, batch_size, context, generator)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), losses


@torch.no_grad()
def training_loss(model: ToyGPT, data: torch.Tensor, windows: int = 16, seed: int = 1) -> float:
    """The loss as training computes it: every position of a window in one forward pass (the cheater can peek)."""
    x, y = random_windows(data, windows, model.context_length, torch.Generator().manual_seed(seed))
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()


@torch.no_grad()
def honest_loss(model: ToyGPT, data: torch.Tensor, windows: int = 16, seed: int = 1) -> float:
    """The loss that generation gets: token t+1 predicted from tokens 0..t only (one forward pass per prefix)."""
    x, y = random_windows(data, windows, model.context_length, torch.Generator().manual_seed(seed))
    total = 0.0
    for t in range(x.shape[1]):
        logits = model(x[:, : t + 1])[:, -1]  # the last position sees nothing after t: there is nothing after t
        total += F.cross_entropy(logits, y[:, t], reduction="sum").item()
    return total / y.numel()


@torch.no_grad()
def generate(model: ToyGPT, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.8, seed: int = 0
             ) -> torch.Tensor:
    """Sample ``max_new_tokens`` ids after ``prompt`` (1-D ids), one at a time over the last window."""
    generator = torch.Generator().manual_seed(seed)
    ids = prompt.clone()
    for _ in range(max_new_tokens):
        logits = model(ids[-model.context_length:][None])[0, -1]
        probs = torch.softmax(logits / temperature, dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)])
    return ids[len(prompt):]


def known_word_rate(sample: str, vocabulary: set[str]) -> float:
    """The share of the sample's words (letters only, lower-cased) that occur in ``vocabulary``: near 1 for
    text that spells words, low for nonsense."""
    found = re.findall(r"[a-z]+", sample.lower())
    return sum(w in vocabulary for w in found) / len(found) if found else 0.0


@dataclass
class MaskingRun:
    """One model of the comparison: its losses and a sample."""

    causal: bool
    losses: list[float] = field(repr=False)
    training_loss: float
    honest_loss: float
    sample: str
    known_word_rate: float


def compare_masking(text: str, steps: int = 300, context: int = 32, d_model: int = 64, n_layers: int = 2,
                    batch_size: int = 16, sample_tokens: int = 200, seed: int = 0) -> dict[str, MaskingRun]:
    """Train the same toy GPT with and without the causal mask on ``text`` (characters); evaluate both on the
    last tenth (held out). Returns {"no mask": ..., "causal mask": ...}. Uniform guessing scores ln(V)."""
    vocab = CharVocab.from_text(text)
    data = vocab.encode(text)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    vocabulary = set(re.findall(r"[a-z]+", text.lower()))
    prompt = vocab.encode("\n")
    runs = {}
    for name, causal in (("no mask", False), ("causal mask", True)):
        model, losses = train_toy_gpt(train, len(vocab.chars), causal, steps, batch_size, context, d_model,
                                      n_layers=n_layers, seed=seed)
        sample = vocab.decode(generate(model, prompt, sample_tokens, seed=seed))
        runs[name] = MaskingRun(causal, losses, training_loss(model, val), honest_loss(model, val), sample,
                                known_word_rate(sample, vocabulary))
    return runs


def uniform_loss(vocab_size: int) -> float:
    """The loss of guessing uniformly among ``vocab_size`` tokens: ln(V) nats."""
    return math.log(vocab_size)
