"""What goes into the engine and what comes out: jobs, events with text and log-probabilities, tickets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from scratchlm.sampling import SamplingParams


class QueueFullError(Exception):
    """Raised by ``submit`` when the waiting queue is full (the server answers 429)."""


@dataclass
class TokenLogprob:
    """A token's log-probability under the model, with the ``top`` most likely alternatives (best first)."""

    token_id: int
    logprob: float | None  # None for the first prompt token
    top: list[tuple[int, float]]


@dataclass
class GenerationJob:
    """One completion to produce. ``max_tokens=0`` only scores the prompt (``echo`` with logprobs)."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    index: int = 0  # the choice index in the response
    adapter: int = 0  # which LoRA adapter decodes it (serve/adapters.py): 0 is the base model
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the k best alternatives
    prompt_logprobs: bool = False  # also score every prompt token after the first


@dataclass
class Event:
    """What the engine reports about one job: new text, and at the end why it stopped."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # once, with the first event, when asked for
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values were reused, not computed (with the last event)
    error: str | None = None


class Ticket:
    """The caller's handle on submitted work; ``Engine.cancel(ticket)`` frees its slots."""

    def __init__(self, sink: Callable[[object], None]):
        self.sink = sink
        self.cancelled = False  # set by the event loop, read by the worker: a plain bool is enough


def token_logprob(logprobs: torch.Tensor, token_id: int, top: int) -> TokenLogprob:
    """The entry for ``token_id`` from a row of log-probabilities [V], with ``top`` alternatives."""
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        values, ids = torch.topk(logprobs, top)
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id, float(logprobs[token_id]), alternatives)
