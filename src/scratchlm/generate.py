"""Autoregressive generation: prefill the prompts once, then decode one token per step.

    prompts -> right-padded batch -> prefill (fills the KV cache, logits of each prompt's last token)
            -> repeat: sample one token per row -> feed those tokens back (one position each) -> ...

With a drafter (``draft="ngram"`` or a draft model, ``scratchlm.speculative``) a step feeds each row's last
token followed by up to K drafted ones, checks them in order against the logits of that one forward pass, keeps
the accepted ones and cuts the KV cache back to them. With ``ContextShift`` a row that fills the cache drops the
oldest half of its tokens after the first ``keep`` and goes on (``shift_context``).

Every row carries a ``Sequence``: its sampling settings and random generator, the text released so far,
and the stop logic (EOS token, stop strings, token budget). Text is released incrementally and never
splits a UTF-8 character or shows the beginning of a stop string that may still complete.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from scratchlm.errors import ConfigError, ContextLengthError
from scratchlm.model import KVCache, Transformer, apply_rope
from scratchlm.sampling import SamplingParams, apply_penalties, filter_logits, make_generator, sample_token


@dataclass
class Completion:
    """The result of one prompt: its text, token ids, and why it ended (``"stop"`` or ``"length"``)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    forwards: int = 0  # forward passes of the model that produced tokens for this prompt (prefill included)
    drafted: int = 0  # tokens proposed by a drafter (speculative decoding)
    accepted: int = 0  # drafted tokens the model kept
    shifts: int = 0  # context shifts


@dataclass(frozen=True)
class ContextShift:
    """Go on past the context window: keep the first ``keep`` tokens, drop the oldest half of the rest.

    ``mode="recompute"`` (default) prefills the shifted tokens again, so the cache is exactly what a fresh
    forward pass over them gives; ``"rotate"`` moves the cached keys and values and turns the keys back by the
    dropped distance (RoPE composes: R(p - d) k = R(-d) R(p) k), as llama.cpp does: no forward pass, but the
    kept tokens' deeper-layer states still saw the dropped ones. Models with learned positions recompute."""

    keep: int = 0
    mode: str = "recompute"

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0:
            raise ConfigError(f"keep={self.keep!r} must be an integer >= 0 (prompt tokens kept by a context shift)")
        if self.mode not in ("recompute", "rotate"):
            raise ConfigError(f"unknown context shift mode {self.mode!r}: choose recompute or rotate")


@dataclass
class DecodeStats:
    """Totals over the prompts of calls: tokens, forward passes, drafted and accepted tokens, shifts, and the
    seconds spent in prefill (to the first tokens) and after it (the consumer's time between chunks included)."""

    generated: int = 0
    forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    shifts: int = 0
    prompts: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def add(self, seq: Sequence) -> None:
        self.prompts += 1
        self.generated += seq.generated
        self.forwards += seq.forwards
        self.drafted += seq.drafted
        self.accepted += seq.accepted
        self.shifts += seq.shifts

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.generated / self.forwards if self.forwards else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after each prompt's first, per second after the first tokens (BENCHMARKS.md's decode rate)."""
        return (self.generated - self.prompts) / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        line = f"{self.generated} tokens in {self.forwards} forward passes ({self.tokens_per_forward:.2f} per pass)"
        if self.drafted:
            line += f"; drafted {self.drafted}, accepted {self.accepted} ({100 * self.acceptance_rate:.0f}%)"
        if self.shifts:
            line += f"; {self.shifts} context shift{'s' if self.shifts > 1 else ''}"
        if self.decode_seconds > 0:
            line += f"; prefill {self.prefill_seconds:.2f} s, then {self.decode_tokens_per_second:.1f} tokens/s"
        return line


class Sequence:
    """One prompt being completed, and everything needed to decide its next token and when it ends."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, eos_ids: set[int],
                 vocab_size: int, context_length: int, context_shift: bool = False):
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= context_length:
            raise ContextLengthError(
                f"prompt of {len(prompt_ids)} tokens does not fit the context window of {context_length} tokens "
                "(leave room for at least one new token): shorten the prompt"
            )
        self.prompt_ids = list(prompt_ids)
        self.params = params
        # A context shift makes room as generation goes on: then only max_new_tokens limits the output.
        self.budget = params.max_new_tokens if context_shift else min(params.max_new_tokens,
                                                                      context_length - len(prompt_ids))
        self.eos_ids = set() if params.ignore_eos else eos_ids
        self.generator = None if params.greedy else make_generator(params.seed)
        self.decoder = tokenizer.stream_decoder()
        self.output_ids: list[int] = []
        self.text = ""
        self._held = ""  # released text waiting because it could be the start of a stop string
        self.finish_reason: str | None = None
        self.generated = 0  # tokens chosen, an end-of-sequence token included
        self.forwards = self.drafted = self.accepted = self.shifts = 0
        self._penalised = params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        # Structured output: a per-sequence position in the constraint, which masks the logits (structured/).
        self.constraint = params.constraint.start(tokenizer, eos_ids) if params.constraint is not None else None
        if self._penalised:
            self._context = torch.tensor(self.prompt_ids, dtype=torch.long)
            self._counts = torch.zeros(vocab_size, dtype=torch.long)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def next_token(self, logits: torch.Tensor) -> int:
        """Choose this sequence's next token from its logits [V]."""
        if self.constraint is not None:
            logits = self.constraint.apply(logits)
        if not self._penalised:
            return sample_token(logits, self.params, self.generator)
        return sample_token(logits, self.params, self.generator, self._context, self._counts)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution [V] that ``next_token`` samples from (masks, penalties, temperature and filters
        applied): what speculative sampling checks drafted tokens against."""
        if self.constraint is not None:
            logits = self.constraint.apply(logits)
        if self._penalised:
            logits = apply_penalties(logits.float(), self.params, self._context, self._counts)
        return filter_logits(logits.float(), self.params).softmax(-1)

    def push(self, token_id: int) -> str:
        """Record a generated token; returns the text it releases (may be empty)."""
        self.generated += 1
        self.output_ids.append(token_id)
        if self._penalised:
            self._context = torch.cat([self._context, torch.tensor([token_id])])
            self._counts[token_id] += 1
        if self.constraint is not None:
            self.constraint.advance(token_id)
        if token_id in self.eos_ids:
            self.output_ids.pop()
            return self._finish("stop", self.decoder.flush())
        chunk = self._held + self.decoder.push(token_id)
        self._held = ""
        for stop in self.params.stop:
            at = chunk.find(stop)
            if at >= 0:
                return self._finish("stop", chunk[:at], drop_rest=True)
        if self.constraint is not None and self.constraint.finished:  # complete, and nothing may follow
            return self._finish("stop", chunk + self.decoder.flush())
        if len(self.output_ids) >= self.budget:
            return self._finish("length", chunk + self.decoder.flush())
        if self.params.stop:
            # Text already released was never a stop prefix (it would have been held), so only the
            # new chunk can end with the beginning of a stop string.
            keep = _longest_stop_prefix_suffix(chunk, self.params.stop)
            if keep:
                chunk, self._held = chunk[:-keep], chunk[-keep:]
        self.text += chunk
        return chunk

    def _finish(self, reason: str, chunk: str, drop_rest: bool = False) -> str:
        if not drop_rest:
            for stop in self.params.stop:  # a stop string completed only by the final flush
                at = chunk.find(stop)
                if at >= 0:
                    chunk, reason = chunk[:at], "stop"
        self.finish_reason = reason
        self.text += chunk
        return chunk

    def completion(self) -> Completion:
        return Completion(self.text, self.output_ids, self.finish_reason or "length", len(self.prompt_ids),
                          self.forwards, self.drafted, self.accepted, self.shifts)


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is the beginning of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


@torch.inference_mode()
def prefill(model: Transformer, prompts: list[list[int]], cache: KVCache) -> torch.Tensor:
    """Run the prompts (right-padded into one batch) through the model, filling ``cache``.

    Returns the logits of each prompt's last token, [B, V], in float32.
    """
    device = cache.k.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    batch = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        batch[row, : len(ids)] = torch.tensor(ids, device=device)
    hidden = model.hidden_states(batch, cache, input_lengths=lengths)  # (B, T, C)
    last = hidden[torch.arange(len(prompts), device=device), lengths - 1]  # (B, C)
    return model.logits(last).float()


@torch.inference_mode()
def decode_step(model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per row ([B, 1]) and return the next logits [B, V] in float32."""
    return model.logits(model.hidden_states(tokens, cache)[:, -1]).float()


def shift_context(model: Transformer, cache: KVCache, row: int, window: list[int], shift: ContextShift) -> list[int]:
    """Make room in a full cache row: keep its first ``shift.keep`` tokens, drop the oldest half of the rest.

    ``window`` lists the tokens the row caches (``cache.lengths[row]`` of them); returns the tokens it caches
    afterwards. Positions are cache indices, so the kept tail moves down by the dropped count.
    """
    n = len(window)
    keep = min(shift.keep, n)
    drop = (n - keep) // 2
    if drop < 1:
        raise ContextLengthError(f"a context shift keeping {shift.keep} tokens frees nothing in a window of {n} "
                                 "tokens: give a smaller keep")
    kept = window[:keep] + window[keep + drop:]
    if shift.mode == "rotate" and model.config.positions == "rope":
        with torch.inference_mode():
            for kv in (cache.k, cache.v):
                kv[:, row, :, keep: n - drop] = kv[:, row, :, keep + drop: n].clone()
            cos, signed_sin = model.rope(cache.k.device)
            # Rotating by -drop: cos is even, sin odd, so the signed sine table of position drop, negated.
            keys = cache.k[:, row, :, keep: n - drop]
            cache.k[:, row, :, keep: n - drop] = apply_rope(keys.float(), cos[drop], -signed_sin[drop]).to(keys.dtype)
        cache.lengths[row] = n - drop
    else:  # recompute: the cache is exactly a fresh prefill of the kept tokens
        cache.lengths[row] = 0
        with torch.inference_mode():
            model.hidden_states(torch.tensor([kept], device=cache.k.device), cache,
                                rows=torch.tensor([row], device=cache.k.device))
    return kept


def make_drafter(draft, model: Transformer, batch_size: int, max_len: int):
    """A drafter from ``draft``: ``"ngram"`` (prompt lookup), a draft ``Transformer`` with the same vocabulary, or
    an object with the drafters' ``draft`` method (``speculative.NgramDrafter`` shows it)."""
    from scratchlm import speculative

    if hasattr(draft, "draft") and hasattr(draft, "draft_cost"):
        return draft
    if draft == "ngram":
        return speculative.NgramDrafter()
    if isinstance(draft, torch.nn.Module):
        return speculative.ModelDrafter(draft, batch_size, max_len, speculative.weight_bytes(model))
    raise ConfigError(f"unknown draft {draft!r}: give 'ngram' or a draft model")


def stream_sequences(model: Transformer, sequences: list[Sequence], draft=None, draft_tokens: int | None = None,
                     shift: ContextShift | None = None, stats: DecodeStats | None = None,
                     adaptive: bool = True) -> Iterator[tuple[int, str]]:
    """Complete every sequence; yields ``(row, text)`` as each row releases text, until all are done.

    ``draft``: None (one token per step), ``"ngram"`` or a draft model (speculative decoding, at most
    ``draft_tokens`` drafted per step, fewer when they are rarely accepted, unless ``adaptive=False``: then
    always ``draft_tokens`` when the drafter has them). ``shift``: go on past a full cache
    (``ContextShift``). ``stats``: a ``DecodeStats`` that receives the totals when generation ends.
    """
    from scratchlm import speculative

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    k_max = 0
    if draft is not None:
        speculative.check_draft_tokens(draft_tokens)
        k_max = draft_tokens or speculative.DEFAULT_DRAFT_TOKENS["ngram" if draft == "ngram" else "model"]
    # Drafted tokens past a row's budget are never kept, but a verification pass writes them to the cache.
    max_len = min(max(len(s.prompt_ids) + s.budget for s in sequences) + k_max, model.config.context_length)
    decoder = getattr(model, "decoder", None)  # a compiled decode step (scratchlm.compiled), when attached
    if decoder is not None:
        max_len = decoder.cache_length(max_len)
    # Against the context, not max_len: a short generation's cache is smaller, but a shift happens only in a cache
    # as long as the context (a shorter one holds every token), so the same keep is valid whatever the budget.
    window = model.config.context_length
    if shift is not None and shift.keep > window // 2:
        raise ConfigError(f"keep={shift.keep} is more than half of the {window}-token window: a context shift "
                          f"must free room; keep at most {window // 2} tokens")
    cache = KVCache(model.config, len(sequences), max_len=max_len, dtype=dtype, device=device)
    drafter = make_drafter(draft, model, len(sequences), max_len) if draft is not None else None
    policies = [speculative.DraftLength(k_max, drafter.draft_cost, adaptive=adaptive) for _ in sequences] \
        if drafter else []
    # The tokens each row caches, when a drafter or a context shift needs them.
    windows = [list(s.prompt_ids) for s in sequences] if drafter is not None or shift is not None else None
    started = first = time.perf_counter()
    try:
        logits = prefill(model, [s.prompt_ids for s in sequences], cache)
        last = [0] * len(sequences)  # each row's newest token: chosen, not yet fed to the model
        for row, seq in enumerate(sequences):
            seq.forwards += 1
            last[row] = seq.next_token(logits[row])
        first = time.perf_counter()
        for row, seq in enumerate(sequences):
            text = seq.push(last[row])
            if text:
                yield row, text
        tokens = torch.zeros(len(sequences), 1, dtype=torch.long, device=device)
        while True:
            live = [row for row, seq in enumerate(sequences) if not seq.finished]
            if not live:
                return
            if shift is not None:
                for row in live:
                    if len(windows[row]) + 1 > max_len:
                        windows[row] = shift_context(model, cache, row, windows[row], shift)
                        sequences[row].shifts += 1
            drafts = speculative.draft_step(drafter, policies, sequences, live, windows, last, max_len) \
                if drafter else {}
            if drafts:
                yield from speculative.verify_step(model, cache, sequences, live, drafts, policies, windows, last)
                continue
            for row, seq in enumerate(sequences):
                if seq.finished:
                    cache.lengths[row] = 0  # a finished row idles at position 0 so it never outgrows its buffer
                tokens[row, 0] = last[row]
            logits = decoder(tokens, cache) if decoder is not None else decode_step(model, tokens, cache)
            for row in live:
                seq = sequences[row]
                seq.forwards += 1
                if windows is not None:
                    windows[row].append(last[row])
                last[row] = seq.next_token(logits[row])
                text = seq.push(last[row])
                if text:
                    yield row, text
    finally:
        if stats is not None:
            for seq in sequences:
                stats.add(seq)
            stats.prefill_seconds += first - started
            stats.decode_seconds += time.perf_counter() - first
