"""Word embeddings from an autoencoder: compress what each word is seen next to, keep the code.

A word's row of the co-occurrence matrix (how often each context word appears within a few words of it) already
describes its meaning, but it is long (one column per context word) and noisy. An autoencoder squeezes each row
through a narrow layer of ``dim`` numbers and learns to rebuild the row from them; to rebuild well, the code has to
keep what distinguishes the word, and words with similar rows get similar codes. The code is the embedding.

Raw counts are dominated by "the" and "and", so the rows are positive pointwise mutual information first
(PPMI: max(0, log p(w, c) / (p(w) p(c))), Church & Hanks 1990; Levy & Goldberg 2014 show that skip-gram with
negative sampling implicitly factorises a shifted PMI matrix, which is why the two methods find similar
neighbours). A linear autoencoder with squared error would find the same subspace as a truncated SVD of the
matrix (Baldi & Hornik 1989); the tanh makes it a small non-linear one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from scratchlm.errors import ConfigError
from scratchlm.lessons.vectors import WordVectors, build_vocabulary, tokenize_words


def cooccurrence(ids: torch.Tensor, vocab_size: int, n_context: int, window: int) -> torch.Tensor:
    """Counts [vocab_size, n_context]: how often context word c (one of the ids below ``n_context``, the most
    frequent words) occurs within ``window`` words of word w, each occurrence weighted by 1 / distance."""
    counts = torch.zeros(vocab_size * n_context)
    for offset in range(1, window + 1):
        for words, contexts in ((ids[:-offset], ids[offset:]), (ids[offset:], ids[:-offset])):
            keep = contexts < n_context
            counts.index_add_(0, words[keep] * n_context + contexts[keep], torch.full((int(keep.sum()),), 1 / offset))
    return counts.view(vocab_size, n_context)


def ppmi(counts: torch.Tensor) -> torch.Tensor:
    """Positive pointwise mutual information of a count matrix, each row then scaled to unit length."""
    total = counts.sum()
    p_word = counts.sum(1, keepdim=True) / total
    p_context = counts.sum(0, keepdim=True) / total
    pmi = torch.log((counts / total) / (p_word * p_context).clamp_min(1e-30)).nan_to_num(0.0, 0.0, 0.0)
    positive = pmi.clamp_min(0.0)
    return positive / positive.norm(dim=1, keepdim=True).clamp_min(1e-12)


class Autoencoder(nn.Module):
    """x -> tanh(encoder(x)) = code (dim numbers) -> decoder(code) ~ x."""

    def __init__(self, n_inputs: int, dim: int):
        super().__init__()
        self.encoder = nn.Linear(n_inputs, dim)
        self.decoder = nn.Linear(dim, n_inputs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x))


def train_autoencoder_embedding(text: str | Sequence[str], dim: int = 64, n_context: int = 2000, window: int = 5,
                                min_count: int = 5, steps: int = 400, lr: float = 3e-3, seed: int = 1
                                ) -> tuple[WordVectors, list[float]]:
    """Word vectors of size ``dim`` from an autoencoder over PPMI rows of ``text``. Returns (vectors, loss per
    step); the loss is the mean squared reconstruction error over whole rows (full batch, Adam)."""
    if dim < 1 or n_context < 1 or window < 1 or steps < 1:
        raise ConfigError("dim, n_context, window and steps must be at least 1")
    tokens = tokenize_words(text) if isinstance(text, str) else list(text)
    words, counts = build_vocabulary(tokens, min_count)
    index = {w: i for i, w in enumerate(words)}
    ids = torch.tensor([index[t] for t in tokens if t in index], dtype=torch.long)
    rows = ppmi(cooccurrence(ids, len(words), min(n_context, len(words)), window))
    torch.manual_seed(seed)
    model = Autoencoder(rows.shape[1], dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        # Squared error summed over a row, averaged over rows: a per-element mean is ~1e-4 and trains slowly.
        loss = ((model(rows) - rows) ** 2).sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        codes = model.encode(rows)
    return WordVectors(words, codes, counts), losses
