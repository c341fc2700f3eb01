"""Perplexity of a model on a text, with a sliding window for texts longer than the context.

Perplexity is exp(mean negative log-likelihood per predicted token): how many equally likely choices the
model is hesitating between, on average. A text longer than the window is scored in windows of ``context``
tokens that start ``stride`` tokens apart; each window only scores the tokens that the previous window did
not score, so each token is predicted at most once, with at least ``context - stride`` tokens of history.
This is the procedure of HF transformers' guide "Perplexity of fixed-length models" (same windows, same
tokens scored), so the two agree on the same model and token ids.

    stride == context   disjoint windows: fast, but tokens early in a window see little history, and the
                        first token of each window is not scored at all (it has no history there)
    stride <  context   overlapping windows: slower (context / stride times the work), closer to the truth
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scratchlm.errors import ConfigError, ContextLengthError


@dataclass
class PerplexityResult:
    """Perplexity and its ingredients: ``nll`` is the summed negative log-likelihood in nats."""

    perplexity: float
    nll: float
    tokens: int  # tokens predicted
    windows: int

    @property
    def bits_per_token(self) -> float:
        return self.nll / self.tokens / math.log(2)


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_scored)`` of each window over ``n_tokens`` tokens: the last ``n_scored`` are scored."""
    out, scored_until = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        # The first token of a window has no history inside it, so it is never scored there.
        n_scored = min(end - scored_until, end - begin - 1)
        if n_scored > 0:
            out.append((begin, end, n_scored))
        scored_until = end
        if end == n_tokens:
            break
    return out


@torch.inference_mode()
def perplexity(model, token_ids: list[int] | torch.Tensor, context: int | None = None, stride: int | None = None,
               progress: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` on ``token_ids`` with windows of ``context`` tokens, ``stride`` apart.

    ``context`` defaults to the model's context length (capped at 1024 to bound the work), ``stride`` to
    half of ``context``. ``progress`` shows a bar with rate and ETA.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    limit = model.config.context_length
    context = context or min(limit, 1024)
    stride = stride or max(1, context // 2)
    if context < 2:
        raise ConfigError(f"--context must be at least 2 tokens, got {context}")
    if context > limit:
        raise ContextLengthError(f"--context {context} is longer than the model's context window of {limit} tokens")
    if not 1 <= stride <= context:
        raise ConfigError(f"--stride must be between 1 and the context ({context}), got {stride}")
    if ids.numel() < 2:
        raise ConfigError(f"the text has {ids.numel()} token(s): perplexity needs at least 2")
    spans = windows(ids.numel(), context, stride)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=ids.numel() - 1, unit="tok", desc="perplexity", dynamic_ncols=True, file=sys.stderr)
    for begin, end, n_scored in spans:
        window = ids[begin:end].to(device)[None]  # (1, T)
        hidden = model.hidden_states(window)[0, -n_scored - 1 : -1]  # states that predict the scored tokens
        logits = model.logits(hidden).float()  # (n_scored, V); log-softmax in float32
        nll += F.cross_entropy(logits, window[0, -n_scored:], reduction="sum").item()
        count += n_scored
        if bar is not None:
            bar.update(n_scored)
            bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}")
    if bar is not None:
        bar.close()
    return PerplexityResult(math.exp(nll / count), nll, count, len(spans))


def perplexity_of_text(llm, text: str, context: int | None = None, stride: int | None = None,
                       progress: bool = False) -> PerplexityResult:
    """Tokenize ``text`` with the model's tokenizer (no special tokens added) and score it."""
    ids = llm.tokenizer.encode(text, allowed_special="none")
    return perplexity(llm.model, ids, context, stride, progress)
