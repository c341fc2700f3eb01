"""Speculative decoding: a cheap drafter proposes K tokens, the model checks them all in one forward pass.

A decode step on a CPU reads every weight to produce one token; a forward pass over K+1 tokens reads them once
too, so every drafted token the model agrees with is a token nearly for free (Leviathan et al. 2023, "Fast
Inference from Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model
Decoding with Speculative Sampling"). Two drafters:

- ``NgramDrafter`` (prompt lookup, Saxena 2023): find the last few tokens earlier in the prompt or the text so
  far and propose what followed them there. Free to run; it pays where the answer copies from the input
  (summaries, extraction, rewriting, code edits, RAG answers).
- ``ModelDrafter``: a smaller model with the same tokenizer decodes K tokens ahead with its own KV cache.

Checking a draft (``verify_token``) keeps the output exactly what the model alone would give:

- greedy: the model's own choice at each position is computed anyway; a draft token is accepted when it is that
  choice, so the text is identical to plain greedy decoding;
- sampling: draft token x, drafted with probability q(x), is accepted with probability min(1, p(x)/q(x)); on
  rejection the token is drawn from norm(max(0, p - q)). Each emitted token is then distributed exactly as p
  (Leviathan et al. 2023, Theorem 3.5; Chen et al. 2023, Theorem 1). Prompt lookup proposes one token for sure
  (q is one-hot), so it is accepted with probability p(x) and a rejection draws from p without x.

p is the distribution the plain sampler would use at that position, penalties, structured-output masks and
filters included (``Sequence.probabilities``), because tokens are checked in order and each accepted token is
pushed before the next position is checked.

How many tokens to draft (``DraftLength``): drafting K tokens that are each accepted with probability a yields
(1 - a^(K+1)) / (1 - a) tokens per forward pass (Leviathan et al. 2023, eq. 1) at a cost that grows with K; the
estimate of a follows the acceptances seen, and K = 0 (plain decoding) is chosen when drafting does not pay.
The choice depends only on what was accepted, never on timings, so a seeded run is reproducible.
"""

from __future__ import annotations

import torch

from scratchlm.errors import ConfigError
from scratchlm.sampling import filter_logits

MAX_DRAFT_TOKENS = 32
DEFAULT_DRAFT_TOKENS = {"ngram": 8, "model": 5}
# Cost of checking one more drafted token, as a fraction of a one-token decode step. A CPU decode step of a
# small model is bound by reading the weights, which a pass over k more tokens reads once too; each extra query
# row adds its share of the arithmetic and of the lm-head. An estimate, NOT yet measured: the only measurements so
# far ran on a machine at load 17 on 2 cores and meant nothing. benchmarks/speculative.py prints the slope c of
# t(1 + k) / t(1) = 1 + c k for SmolLM2 (int4 and float32): set this from its run on a quiet machine.
VERIFY_COST_PER_TOKEN = 0.12
PROBE_EVERY = 16  # with drafting turned off, try one short draft again after this many plain steps


def check_draft_tokens(k: int | None) -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT_TOKENS):
        raise ConfigError(f"draft_tokens={k!r} is out of range: give an integer from 1 to {MAX_DRAFT_TOKENS} "
                          "(the most tokens drafted per step)")


# ---- choosing the draft length ------------------------------------------------------------------------
def expected_tokens(accept: float, k: int) -> float:
    """Tokens one verification pass yields when each of ``k`` drafted tokens is accepted with probability
    ``accept`` (independently): 1 + a + a^2 + ... + a^k."""
    return sum(accept**i for i in range(k + 1))


class DraftLength:
    """Adaptive K for one sequence: the draft length that maximises expected tokens per unit of cost.

    ``draft_cost`` is the cost of drafting one token relative to a decode step of the model (0 for prompt
    lookup, about the weight-size ratio for a draft model). The acceptance estimate is an exponential moving
    average of the per-token acceptance, starting optimistic so that drafting is tried.
    """

    def __init__(self, max_k: int, draft_cost: float = 0.0, verify_cost: float = VERIFY_COST_PER_TOKEN,
                 prior: float = 0.6, decay: float = 0.8, adaptive: bool = True):
        self.max_k, self.draft_cost, self.verify_cost, self.adaptive = max_k, draft_cost, verify_cost, adaptive
        self.accept, self.decay = prior, decay
        self._off_steps = 0

    def choose(self, room: int) -> int:
        """How many tokens to draft now (0: decode plainly), at most ``room``."""
        if not self.adaptive:
            return max(0, min(self.max_k, room))
        best_k, best = 0, 1.0
        for k in range(1, min(self.max_k, room) + 1):
            value = expected_tokens(self.accept, k) / (1.0 + (self.verify_cost + self.draft_cost) * k)
            if value > best:
                best_k, best = k, value
        if best_k == 0 and room > 0:
            self._off_steps += 1
            if self._off_steps >= PROBE_EVERY:  # look again: the text may have turned to copying
                self._off_steps = 0
                return 1
        return best_k

    def update(self, drafted: int, accepted: int) -> None:
        """Record a verification: ``accepted`` of ``drafted`` tokens were kept (then one was rejected unless all
        were kept). Each checked token is one Bernoulli trial of the per-token acceptance."""
        if drafted <= 0:
            return
        trials = accepted + (1 if accepted < drafted else 0)
        rate = accepted / trials
        weight = self.decay ** trials
        self.accept = weight * self.accept + (1 - weight) * rate


# ---- verification: the rejection-sampling rule --------------------------------------------------------
def verify_token(seq, logits: torch.Tensor, draft: int, q: torch.Tensor | None) -> tuple[int, bool]:
    """The token ``seq`` emits at a position whose model logits are ``logits`` [V], given the drafted token
    ``draft`` (drawn from ``q`` [V], or proposed for sure when ``q`` is None). Returns (token, accepted)."""
    if seq.params.greedy:
        token = seq.next_token(logits)  # the model's own choice: penalties and masks included
        return token, token == draft
    p = seq.probabilities(logits)
    q_draft = 1.0 if q is None else float(q[draft])
    # Accept with probability min(1, p(x) / q(x)): draw u ~ U[0, 1) and accept when u * q(x) < p(x).
    if float(torch.rand((), generator=seq.generator)) * q_draft < float(p[draft]):
        return draft, True
    if q is None:
        residual = p.clone()
        residual[draft] = 0.0
    else:
        residual = (p - q).clamp_(min=0.0)
    total = float(residual.sum())
    if not total > 0.0:  # p == q up to rounding: the residual is empty, and p itself is the right law
        residual, total = p, float(p.sum())
    return int(torch.multinomial(residual / total, 1, generator=seq.generator)), False


# ---- drafters -------------------------------------------------------------------------------------------
class NgramDrafter:
    """Prompt lookup: the continuation of the latest earlier occurrence of the last n tokens (n from
    ``max_ngram`` down to ``min_ngram``), searched in the prompt and the text generated so far."""

    name = "ngram"
    draft_cost = 0.0

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, history: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed an earlier occurrence of ``history``'s last n tokens."""
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(history) <= n:
                continue
            pattern = history[-n:]
            last = pattern[-1]
            # Scan backwards from just before the suffix itself; the latest match continues most recently.
            for end in range(len(history) - 2, n - 2, -1):
                if history[end] == last and history[end - n + 1: end + 1] == pattern:
                    follow = history[end + 1: end + 1 + k]
                    if follow:
                        return follow
        return []

    def draft(self, rows: list[int], histories: list[list[int]], windows: list[list[int]], ks: list[int],
              seqs) -> list[tuple[list[int], None]]:
        return [(self.propose(h, k), None) for h, k in zip(histories, ks)]


class ModelDrafter:
    """A smaller model with the same tokenizer drafts by decoding ahead, with a KV cache of its own per row.

    Its cache holds a prefix of each row's window (the tokens the model has cached, plus the last one): drafting
    first cuts a row back to the longest prefix it shares with the window (rejected drafts and a context shift
    drop out there), feeds the missing tail, then one token at a time.
    """

    name = "model"

    def __init__(self, model, batch_size: int, max_len: int, target_bytes: int):
        from scratchlm.model import KVCache

        self.model = model
        param = next(model.parameters())
        self.max_len = min(max_len, model.config.context_length)
        self.cache = KVCache(model.config, batch_size, self.max_len, dtype=param.dtype, device=param.device)
        self.cached: list[list[int]] = [[] for _ in range(batch_size)]  # the tokens each cache row holds
        # A CPU decode step costs about the bytes of weights it reads: the drafter's per-token cost relative to
        # the model's is their size ratio.
        self.draft_cost = weight_bytes(model) / max(1, target_bytes)

    @torch.inference_mode()
    def draft(self, rows: list[int], histories: list[list[int]], windows: list[list[int]], ks: list[int],
              seqs) -> list[tuple[list[int], list[torch.Tensor] | None]]:
        """Draft up to ``ks[i]`` tokens after ``windows[i]`` for cache row ``rows[i]``; greedy rows draft the
        argmax, sampling rows draw from the drafter's filtered distribution q (returned for verification)."""
        device = self.cache.k.device
        out: list[tuple[list[int], list | None]] = [([], None) for _ in rows]
        live = []
        ks = [min(k, self.max_len - len(window)) for k, window in zip(ks, windows)]
        for i, (row, window, k) in enumerate(zip(rows, windows, ks)):
            if k <= 0:
                continue  # the window outgrew the drafter's context: no draft for this row
            held = self.cached[row]
            same = _common_prefix(held, window, len(window) - 1)  # at least the last token is fed
            self.cache.lengths[row] = same
            self.cached[row] = held[:same]
            live.append(i)
        if not live:
            return out
        # Feed each live row's missing tail as one right-padded batch on the rows it belongs to (one row at a time
        # when the padded batch would run past the cache: a row refilled after a context shift beside a long one).
        tails = [windows[i][len(self.cached[rows[i]]):] for i in live]
        width = max(len(t) for t in tails)
        starts = [len(self.cached[rows[i]]) for i in live]
        groups = [list(range(len(live)))] if max(starts) + width <= self.max_len else [[j] for j in range(len(live))]
        last_logits = []
        for group in groups:
            width = max(len(tails[j]) for j in group)
            ids = torch.zeros(len(group), width, dtype=torch.long, device=device)
            for n, j in enumerate(group):
                ids[n, : len(tails[j])] = torch.tensor(tails[j])
            index = torch.tensor([rows[live[j]] for j in group], device=device)
            lengths = torch.tensor([len(tails[j]) for j in group], device=device)
            hidden = self.model.hidden_states(ids, self.cache, rows=index, input_lengths=lengths)
            last_logits.append(self.model.logits(hidden[torch.arange(len(group), device=device), lengths - 1]))
        logits = torch.cat(last_logits).float()
        for i in live:
            self.cached[rows[i]] = list(windows[i])
        drafts: list[list[int]] = [[] for _ in live]
        qs: list[list[torch.Tensor]] = [[] for _ in live]
        going = list(range(len(live)))  # positions in ``live`` of the rows still drafting
        while True:
            for j, at in enumerate(going):
                i = live[at]
                seq = seqs[i]
                if seq.params.greedy:
                    token = int(logits[j].argmax())
                else:
                    q = filter_logits(logits[j], seq.params).softmax(-1)
                    token = int(torch.multinomial(q, 1, generator=seq.generator))
                    qs[at].append(q)
                drafts[at].append(token)
            going = [at for at in going if len(drafts[at]) < ks[live[at]]]
            if not going:
                break
            # Feed the newest draft token of the rows that need more (the last draft token is never fed).
            feed = torch.tensor([[drafts[at][-1]] for at in going], device=device)
            index = torch.tensor([rows[live[at]] for at in going], device=device)
            logits = self.model.logits(self.model.hidden_states(feed, self.cache, rows=index)[:, -1]).float()
            for at in going:
                self.cached[rows[live[at]]].append(drafts[at][-1])
        for at, i in enumerate(live):
            out[i] = (drafts[at], qs[at] or None)
        return out


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n, end = 0, min(len(a), len(b), limit)
    while n < end and a[n] == b[n]:
        n += 1
    return n


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (quantized weights are buffers), each tensor counted once."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


# ---- building a drafter ---------------------------------------------------------------------------------
def check_same_vocabulary(target, draft, draft_name: str) -> None:
    """Refuse a draft model whose token ids mean other tokens than the model's (both are LLMs)."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise ConfigError(f"draft model {draft_name} has a vocabulary of {draft.config.vocab_size} tokens, the "
                          f"model {target.config.vocab_size}: speculative decoding needs the same tokenizer "
                          "(use a draft model from the same family, or --draft ngram)")
    if draft.tokenizer._token_to_id != target.tokenizer._token_to_id:
        raise ConfigError(f"draft model {draft_name} has another tokenizer than the model (its token ids mean "
                          "other text): use a draft model with the same tokenizer, or --draft ngram")
