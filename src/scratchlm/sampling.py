"""Choosing the next token from logits: penalties, temperature, top-k, top-p, min-p, then a draw.

The order follows HF transformers' ``generate``: penalties reshape the raw logits, temperature
sharpens or flattens them, then the three filters remove unlikely tokens, and the survivors are sampled.
Temperature 0 means greedy decoding (argmax), with no randomness at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from scratchlm.errors import SamplingError

# Below 1e-5, logits / temperature overflows float32 to inf and the softmax to NaN; the limit of sampling as
# temperature -> 0 is the argmax anyway, so such temperatures decode greedily.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Validated on construction."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # nucleus: keep the smallest set whose probability reaches p (Holtzman 2019)
    min_p: float | None = None  # keep tokens at least min_p times as likely as the best one
    repetition_penalty: float = 1.0  # CTRL (Keskar 2019): divide positive logits of seen tokens by this
    presence_penalty: float = 0.0  # OpenAI: subtract once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated text
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)  # strings that end generation (not included)
    ignore_eos: bool = False
    constraint: object | None = None  # structured output: a scratchlm.structured.Constraint (JSON schema, grammar)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> SamplingError:
            return SamplingError(f"invalid {name}={getattr(self, name)!r}: must be {rule}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an integer >= 1")
        if not (isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 100.0):
            raise bad("temperature", "between 0 and 100 (0 = greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise bad("top_k", "an integer >= 1 (or unset)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", "in (0, 10] (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "between -2 and 2")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "an integer")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


# The defaults of ``LLM`` and of the CLI's generate and chat; the server keeps OpenAI's (field by field in
# serve/jobs.py). At temperature 0.7 SmolLM2-135M looped ("la la la ...") in 6 of 32 answers to simple
# questions (int4); a repetition penalty of 1.1 with top-k 40 and min-p 0.05, the settings llama.cpp and Ollama
# use, brought loops to 0-1 in 32 and more right answers (benchmarks/sampling_defaults.py, RESULTS.md).
DEFAULT_SAMPLING: dict = dict(max_new_tokens=256, temperature=0.7, top_k=40, min_p=0.05, repetition_penalty=1.1)
# Sampling from the model's own distribution, as OpenAI's API does unless asked: for comparisons with it.
PLAIN_SAMPLING: dict = dict(top_k=None, top_p=None, min_p=None, repetition_penalty=1.0)


def with_defaults(**given) -> dict:
    """``given`` sampling options over ``DEFAULT_SAMPLING``. Greedy decoding (temperature 0) stays the plain
    argmax of the model (what tests and evaluations compare against) unless a repetition penalty is given."""
    merged = {**DEFAULT_SAMPLING, **given}
    if merged.get("temperature", 1.0) < GREEDY_BELOW and "repetition_penalty" not in given:
        merged["repetition_penalty"] = 1.0
    return merged


def make_generator(seed: int | None, device="cpu") -> torch.Generator:
    """A random generator for one sequence: seeded for reproducibility, else from the OS."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int.from_bytes(__import__("os").urandom(8), "little") >> 1)
    return g


def apply_penalties(logits: torch.Tensor, params: SamplingParams, context_ids: torch.Tensor | None,
                    output_counts: torch.Tensor | None) -> torch.Tensor:
    """Penalise tokens already seen. ``logits`` [V]; ``context_ids`` the prompt and output so far;
    ``output_counts`` [V] how often each token was generated."""
    if params.repetition_penalty != 1.0 and context_ids is not None and context_ids.numel():
        seen = logits[context_ids]
        logits = logits.scatter(0, context_ids, torch.where(seen > 0, seen / params.repetition_penalty,
                                                            seen * params.repetition_penalty))
    if output_counts is not None and (params.presence_penalty or params.frequency_penalty):
        counts = output_counts.to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p: removed tokens get -inf. ``logits`` [V], float32."""
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the best token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), -math.inf)
    if params.min_p is not None and params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), -math.inf)
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                 context_ids: torch.Tensor | None = None, output_counts: torch.Tensor | None = None) -> int:
    """The next token id for one sequence, from its logits [V]."""
    logits = apply_penalties(logits.float(), params, context_ids, output_counts)
    if params.greedy:
        return int(logits.argmax())
    probs = filter_logits(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
