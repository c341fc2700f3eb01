"""Scaled dot-product attention written out, step by step (Vaswani et al. 2017, section 3.2.1, eq. 1):

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V

It is ``lookup.soft_lookup`` with three changes: every position is a query at once (a matrix Q instead of one
vector q); similarity is a dot product scaled by 1/sqrt(d) instead of a cosine (dot products of d-dimensional
random vectors grow like sqrt(d), and a softmax of large scores is one-hot with vanishing gradients); and the
queries, keys and values are *learned* linear projections of the same token vectors, so training decides what
each token looks for (W_q), what it offers to be found by (W_k) and what it hands over when found (W_v).

A causal mask hides the keys after each query (``causal_mask``): a language model predicts token t+1 from
tokens 0..t and must not see t+1 itself. ``cheating.py`` shows what happens without it.

``model.Attention`` computes the same thing with PyTorch's fused ``scaled_dot_product_attention``, which never
stores the T x T weights; this file stores them so that they can be printed and plotted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def causal_mask(T: int, device=None) -> torch.Tensor:
    """[T, T] booleans, True where query i may see key j (j <= i): the lower triangle."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d)) v for q [..., Tq, d], k [..., Tk, d], v [..., Tk, dv].

    ``mask`` (broadcast to [..., Tq, Tk]) is True where a query may see a key. Returns (output [..., Tq, dv],
    weights [..., Tq, Tk]); each row of the weights sums to 1.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., Tq, Tk): how well each key fits each query
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: a hidden key gets no weight
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights


class SelfAttention(nn.Module):
    """Multi-head self-attention with learned projections, the explicit way: the weights of the last call stay in
    ``last_weights`` [B, H, T, T] for plotting.

    Its parameters have the shapes and names of ``model.Attention`` (``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj``), so a state dict moves between the two.
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool = True, bias: bool = False):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.head_dim, self.causal = n_heads, d_model // n_heads, causal
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)  # what each token looks for
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)  # what each token is found by
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)  # what each token hands over
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)  # mixes the heads back into one vector
        self.last_weights: torch.Tensor | None = None

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (self.split_heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        mask = causal_mask(T, x.device) if self.causal else None
        y, weights = attention(q, k, v, mask)  # (B, H, T, D), (B, H, T, T)
        self.last_weights = weights.detach()
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


def sdpa_reference(attn: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The same layer through PyTorch's fused ``F.scaled_dot_product_attention``: what ``model.Attention`` runs."""
    B, T, C = x.shape
    q, k, v = (attn.split_heads(p(x)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=attn.causal)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, C))


def plot_attention(weights: torch.Tensor, queries: list[str], keys: list[str] | None = None, ax=None,
                   title: str | None = None):
    """A heat map of attention weights [Tq, Tk] with token labels (queries down, keys across); returns the axes."""
    import matplotlib.pyplot as plt

    keys = queries if keys is None else keys
    if ax is None:
        _, ax = plt.subplots(figsize=(0.45 * len(keys) + 1.5, 0.45 * len(queries) + 1))
    image = ax.imshow(weights.detach().float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(keys)), [repr(t)[1:-1] for t in keys], rotation=90)
    ax.set_yticks(range(len(queries)), [repr(t)[1:-1] for t in queries])
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title)
    ax.figure.colorbar(image, ax=ax, fraction=0.046)
    return ax
