"""Autoregressive generation: prefill the prompts once, then decode one token per step.

    prompts -> right-padded batch -> prefill (fills the KV cache, logits of each prompt's last token)
            -> repeat: sample one token per row -> feed those tokens back (one position each) -> ...

Every row carries a ``Sequence``: its sampling settings and random generator, the text released so far,
and the stop logic (EOS token, stop strings, token budget). Text is released incrementally and never
splits a UTF-8 character or shows the beginning of a stop string that may still complete.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from scratchlm.errors import ContextLengthError
from scratchlm.model import KVCache, Transformer
from scratchlm.sampling import SamplingParams, make_generator, sample_token


@dataclass
class Completion:
    """The result of one prompt: its text, token ids, and why it ended (``"stop"`` or ``"length"``)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


class Sequence:
    """One prompt being completed, and everything needed to decide its next token and when it ends."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, eos_ids: set[int],
                 vocab_size: int, context_length: int):
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= context_length:
            raise ContextLengthError(
                f"prompt of {len(prompt_ids)} tokens does not fit the context window of {context_length} tokens "
                "(leave room for at least one new token): shorten the prompt"
            )
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.budget = min(params.max_new_tokens, context_length - len(prompt_ids))
        self.eos_ids = set() if params.ignore_eos else eos_ids
        self.generator = None if params.greedy else make_generator(params.seed)
        self.decoder = tokenizer.stream_decoder()
        self.output_ids: list[int] = []
        self.text = ""
        self._held = ""  # released text waiting because it could be the start of a stop string
        self.finish_reason: str | None = None
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

    def push(self, token_id: int) -> str:
        """Record a generated token; returns the text it releases (may be empty)."""
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
        return Completion(self.text, self.output_ids, self.finish_reason or "length", len(self.prompt_ids))


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


def stream_sequences(model: Transformer, sequences: list[Sequence]) -> Iterator[tuple[int, str]]:
    """Complete every sequence; yields ``(row, text)`` as each row releases text, until all are done."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    max_len = max(len(s.prompt_ids) + s.budget for s in sequences)
    decoder = getattr(model, "decoder", None)  # a compiled decode step (scratchlm.compiled), when attached
    if decoder is not None:
        max_len = decoder.cache_length(max_len)
    cache = KVCache(model.config, len(sequences), max_len=max_len, dtype=dtype, device=device)
    logits = prefill(model, [s.prompt_ids for s in sequences], cache)
    tokens = torch.zeros(len(sequences), 1, dtype=torch.long, device=device)
    while True:
        for row, seq in enumerate(sequences):
            if seq.finished:
                cache.lengths[row] = 0  # a finished row idles at position 0 so it never outgrows its buffer
                continue
            token = seq.next_token(logits[row])
            tokens[row, 0] = token
            text = seq.push(token)
            if text:
                yield row, text
        if all(s.finished for s in sequences):
            return
        logits = decoder(tokens, cache) if decoder is not None else decode_step(model, tokens, cache)
