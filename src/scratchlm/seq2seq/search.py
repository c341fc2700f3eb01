"""From a trained encoder-decoder to target ids: greedy search and beam search, batched.

Both encode the sources once, then grow the targets one token at a time from the start token, feeding the
decoder the whole prefix at each step (no KV cache: translations here are tens of tokens, so recomputing the
prefix costs little and keeps the code short). A row stops at its end-of-sequence token.

Beam search (Graves 2012; Sutskever et al. 2014, section 3.2) keeps the ``beam_size`` most probable prefixes of
each sentence. Each step scores every one-token extension of every live prefix, log P(prefix) + log p(token),
and keeps the best ``beam_size`` of them (a finished prefix competes with one extension only: itself, at no
cost). At the end the best finished hypothesis wins under score / length ** length_penalty (fairseq's
normalisation; 0 prefers short outputs, 1 compares mean log-probabilities). With ``beam_size=1`` this is
greedy search, token for token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scratchlm.errors import ConfigError, ContextLengthError
from scratchlm.seq2seq.model import Seq2Seq


def pad_sources(model: Seq2Seq, sources: Sequence[Sequence[int]]) -> torch.Tensor:
    """Source id lists as one right-padded tensor [B, S] on the model's device."""
    config = model.config
    if not sources:
        raise ConfigError("nothing to translate: give at least one source text")
    longest = max(len(s) for s in sources)
    if longest > config.max_source_length:
        raise ContextLengthError(f"a source of {longest} tokens is longer than the model's {config.max_source_length}; "
                                 "shorten it or split it into sentences")
    if min(len(s) for s in sources) == 0:
        raise ConfigError("a source is empty: the encoder needs at least one token")
    batch = torch.full((len(sources), longest), config.source_pad_id, dtype=torch.long)
    for row, ids in enumerate(sources):
        batch[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
    return batch.to(next(model.parameters()).device)


def _max_new(model: Seq2Seq, max_length: int | None) -> int:
    limit = model.config.max_target_length - 1  # the start token takes one decoder position
    if max_length is None:
        return limit
    if not 1 <= max_length <= limit:
        raise ConfigError(f"max_length must be between 1 and {limit} (the model's max_target_length - 1), "
                          f"got {max_length}")
    return max_length


def _strip(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


@torch.no_grad()
def greedy_search(model: Seq2Seq, sources: Sequence[Sequence[int]], max_length: int | None = None) -> list[list[int]]:
    """The most probable next token at every step, for each source: target ids without start and end tokens."""
    config = model.config
    was_training = model.training
    model.eval()
    source = pad_sources(model, sources)
    memory, mask = model.encode(source)
    targets = torch.full((len(sources), 1), config.bos_id, dtype=torch.long, device=source.device)
    done = torch.zeros(len(sources), dtype=torch.bool, device=source.device)
    for _ in range(_max_new(model, max_length)):
        logits = model.decode(targets, memory, mask)[:, -1]  # (B, V)
        token = logits.argmax(dim=-1).masked_fill(done, config.pad_id)
        targets = torch.cat([targets, token[:, None]], dim=1)
        done |= token == config.eos_id
        if bool(done.all()):
            break
    model.train(was_training)
    return [_strip(row[1:], config.eos_id) for row in targets.tolist()]


@torch.no_grad()
def beam_search(model: Seq2Seq, sources: Sequence[Sequence[int]], beam_size: int = 4,
                length_penalty: float = 1.0, max_length: int | None = None) -> list[list[int]]:
    """The best hypothesis of a ``beam_size``-wide beam for each source (target ids, no start or end token)."""
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ConfigError(f"beam size must be a positive integer, got {beam_size!r}")
    config = model.config
    was_training = model.training
    model.eval()
    source = pad_sources(model, sources)
    B, K, device = len(sources), beam_size, source.device
    memory, mask = model.encode(source)
    # Each sentence's K hypotheses are K consecutive rows: repeat the memory and its mask K times.
    memory = memory.repeat_interleave(K, dim=0)
    mask = mask._replace(mask=mask.mask.repeat_interleave(K, dim=0))
    targets = torch.full((B * K, 1), config.bos_id, dtype=torch.long, device=device)
    # Only the first hypothesis is live at the start, so the first step does not pick the same token K times.
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    done = torch.zeros(B * K, dtype=torch.bool, device=device)
    lengths = torch.zeros(B * K, device=device)  # tokens generated, end token included
    for _ in range(_max_new(model, max_length)):
        logp = model.decode(targets, memory, mask)[:, -1].float().log_softmax(dim=-1)  # (B*K, V)
        # A finished hypothesis has one extension, padding, that costs nothing.
        logp[done] = float("-inf")
        logp[done, config.pad_id] = 0.0
        V = logp.shape[-1]
        candidates = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
        scores, flat = candidates.topk(K, dim=-1)  # (B, K)
        parent = (flat // V + torch.arange(B, device=device)[:, None] * K).view(-1)  # row of each new hypothesis
        token = (flat % V).view(-1)
        was_done = done[parent]
        targets = torch.cat([targets[parent], token[:, None]], dim=1)
        lengths = lengths[parent] + (~was_done).float()
        done = was_done | (token == config.eos_id)
        if bool(done.all()):
            break
    final = scores.view(-1) / lengths.clamp(min=1) ** length_penalty
    # Prefer finished hypotheses; one cut off at max_length only wins when none of its sentence finished.
    final = final.masked_fill(~done, float("-inf")).view(B, K)
    best = torch.where(done.view(B, K).any(dim=1), final.argmax(dim=1), scores.argmax(dim=1))
    rows = targets.view(B, K, -1)[torch.arange(B, device=device), best].tolist()
    model.train(was_training)
    return [_strip(row[1:], config.eos_id) for row in rows]
