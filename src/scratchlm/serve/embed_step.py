"""The engine's embedding step: ``/v1/embeddings`` inputs answered by the language model itself, between decode
steps, a chunk of tokens at a time (``serve.engine.Engine.embed`` queues them; an ``--embedding-model`` encoder is
``serve/embeddings.py`` instead)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scratchlm.serve.events import Ticket


@dataclass
class EmbedJob:
    """Token lists to embed with the base model or adapter ``adapter``; ``vectors`` fill in as ``next`` advances."""

    inputs: list[list[int]]
    ticket: Ticket
    vectors: list[torch.Tensor | None] = field(default_factory=list)
    next: int = 0
    adapter: int = 0


def embed_some(engine) -> None:
    """Embed up to ``engine.prefill_chunk`` tokens of the first waiting job's inputs (at least one input) as one
    right-padded batch: each input's vector is the mean of its last hidden states, normalised.

    With right padding and causal attention, real tokens never attend to the padding after them, so
    each input's states equal those of the input alone; the mean runs over its real tokens only.
    """
    job = engine._embeds[0]
    if job.ticket.cancelled:
        engine._embeds.popleft()
        return
    device = engine.device
    batch, budget = [], engine.prefill_chunk
    while job.next < len(job.inputs) and (not batch or len(job.inputs[job.next]) <= budget):
        batch.append(job.next)
        budget -= len(job.inputs[job.next])
        job.next += 1
    sizes = [len(job.inputs[i]) for i in batch]
    lengths = torch.tensor(sizes, device=device)
    ids = torch.zeros(len(batch), max(sizes), dtype=torch.long, device=device)
    for row, i in enumerate(batch):
        ids[row, : sizes[row]] = torch.tensor(job.inputs[i])
    engine._select([job.adapter] * len(batch))
    hidden = engine.model.hidden_states(ids).float()  # (B, T, C)
    real = (torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]).float()  # (B, T)
    mean = (hidden * real[..., None]).sum(1) / lengths[:, None]
    vectors = torch.nn.functional.normalize(mean, dim=-1)
    for row, i in enumerate(batch):
        job.vectors[i] = vectors[row].cpu()
    if job.next == len(job.inputs):
        engine._embeds.popleft()
        engine.metrics.record(engine.metrics.prompt_tokens.inc, sum(len(x) for x in job.inputs))
        try:
            job.ticket.sink(job.vectors)
        except Exception:
            pass
