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
  choice, so the text is identical to plain greedy decoding. The pass attends one position at a time
  (``stepwise_attention``), since one attention call over several positions rounds differently from one-token
  steps, which the int4 engine's bfloat16 inputs turn into other tokens; a batch of rows of different lengths
  decodes its plain steps with a mask and is identical only up to rounding (docs/decoding.md);
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

from collections.abc import Iterator

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


# ---- one step of the decode loop (generate.stream_sequences) ----------------------------------------
def draft_step(drafter, policies, sequences, live, windows, last, max_len) -> dict[int, tuple[list[int], list | None]]:
    """Drafts for the rows whose draft length policy asks for some: {row: (tokens, q per token or None)}.

    ``windows[row]`` lists the tokens the model's cache holds for a row, ``last[row]`` its newest token (chosen,
    not yet fed); ``max_len`` is the cache length."""
    rows, ks = [], []
    # One right-padded pass feeds every live row as many positions as the longest draft: the fullest row bounds all.
    cap = max_len - 1 - max(len(windows[row]) for row in live)
    for row in live:
        seq = sequences[row]
        # Room: the cache holds the window, the last token and the drafts; tokens past the budget are wasted.
        room = min(max_len - len(windows[row]) - 1, seq.budget - len(seq.output_ids) - 1, cap)
        k = policies[row].choose(room)
        if k > 0:
            rows.append(row)
            ks.append(k)
    if not rows:
        return {}
    histories = [sequences[r].prompt_ids + sequences[r].output_ids for r in rows]
    proposals = drafter.draft(rows, histories, [windows[r] + [last[r]] for r in rows], ks,
                              [sequences[r] for r in rows])
    return {row: (tokens[:k], qs) for row, k, (tokens, qs) in zip(rows, ks, proposals) if tokens}


def verify_step(model, cache, sequences, live, drafts, policies, windows, last) -> Iterator[tuple[int, str]]:
    """One forward pass over each row's last token and its drafted tokens; keep what verification accepts,
    yielding ``(row, text)`` as ``generate.stream_sequences`` does, and cut each row's cache back to the tokens
    kept (``windows`` and ``last`` are updated in place)."""
    device = cache.k.device
    width = 1 + max(len(tokens) for tokens, _ in drafts.values())
    ids = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    lengths = torch.ones(len(sequences), dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        if seq.finished:
            cache.lengths[row] = 0
            continue
        fed = [last[row], *drafts.get(row, ((), None))[0]]
        ids[row, : len(fed)] = torch.tensor(fed)
        lengths[row] = len(fed)
    start = cache.lengths.clone()
    with torch.inference_mode():
        # One sequence: each position attends alone, as its one-token steps do, so its logits are exactly plain
        # decoding's. A batch's plain steps attend with a mask over rows of other lengths, which rounds its own way:
        # there the cost (an attention call per position and layer) would buy nothing exact.
        hidden = model.hidden_states(ids, cache, input_lengths=lengths, stepwise_attention=len(sequences) == 1)
        logits = model.logits(hidden).float()  # (B, width, V)
    for row in live:
        seq = sequences[row]
        tokens, qs = drafts.get(row, ((), None))
        seq.forwards += 1
        seq.drafted += len(tokens)
        fed, accepted = last[row], 0
        for i in range(len(tokens) + 1):
            if i < len(tokens):
                token, ok = verify_token(seq, logits[row, i], tokens[i], qs[i] if qs else None)
            else:  # every draft token was accepted: the last position gives one more token for free
                token, ok = seq.next_token(logits[row, i]), False
            accepted += ok
            last[row] = token
            text = seq.push(token)
            if text:
                yield row, text
            if not ok or seq.finished:
                break
        seq.accepted += accepted
        if tokens:
            policies[row].update(len(tokens), accepted)
        # Roll the cache back to the tokens kept: the fed token and the accepted drafts. Rejected drafts' keys
        # and values stay in the buffer beyond the row's length, where nothing reads them before they are
        # overwritten.
        cache.lengths[row] = start[row] + 1 + accepted
        windows[row].append(fed)
        windows[row].extend(tokens[:accepted])


# ---- drafters -------------------------------------------------------------------------------------------
class NgramIndex:
    """The latest end position of every n-gram (n in ``sizes``) of one growing token history: prompt lookup is a
    dictionary look-up per step, where a scan would walk the whole prompt and output in Python at every step."""

    def __init__(self, sizes: range):
        self.sizes = sizes
        self.latest: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in sizes}
        self.done = 0  # n-grams ending before this position are indexed
        self.head: tuple[int, ...] = ()
        self.last = -1

    def fits(self, history: list[int]) -> bool:
        """Whether ``history`` continues the one indexed (a reused server slot starts another)."""
        return self.done <= len(history) and tuple(history[:8]) == self.head[:8] and \
            (self.done == 0 or history[self.done - 1] == self.last)

    def extend(self, history: list[int], upto: int) -> None:
        for end in range(self.done, upto):
            for n in self.sizes:
                if end + 1 >= n:
                    self.latest[n][tuple(history[end - n + 1: end + 1])] = end
        self.done, self.head = upto, tuple(history[:8])
        self.last = history[upto - 1] if upto else -1


class NgramDrafter:
    """Prompt lookup: the continuation of the latest earlier occurrence of the last n tokens (n from
    ``max_ngram`` down to ``min_ngram``), searched in the prompt and the text generated so far."""

    name = "ngram"
    draft_cost = 0.0

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._indexes: dict[int, NgramIndex] = {}  # per cache row

    def propose(self, history: list[int], k: int, row: int | None = None) -> list[int]:
        """Up to ``k`` tokens that followed an earlier occurrence of ``history``'s last n tokens (``row``: whose
        index to keep up to date between calls)."""
        index = self._indexes.get(row) if row is not None else None
        if index is None or not index.fits(history):
            index = NgramIndex(range(self.min_ngram, self.max_ngram + 1))
            if row is not None:
                self._indexes[row] = index
        index.extend(history, len(history) - 1)  # not the suffix itself: it is what we look for
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(history) <= n:
                continue
            end = index.latest[n].get(tuple(history[-n:]))
            if end is not None:
                follow = history[end + 1: end + 1 + k]
                if follow:
                    return follow
        return []

    def draft(self, rows: list[int], histories: list[list[int]], windows: list[list[int]], ks: list[int],
              seqs) -> list[tuple[list[int], None]]:
        return [(self.propose(h, k, row), None) for row, h, k in zip(rows, histories, ks)]


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
        argmax, sampling rows draw from the drafter's filtered distribution q (returned for verification).

        Every pass runs on the contiguous rows 0..max(rows) (a view of the cache: nothing is copied); rows with
        nothing to feed get a dummy token written past their cached tokens, and keep their length."""
        out: list[tuple[list[int], list | None]] = [([], None) for _ in rows]
        ks = [min(k, self.max_len - len(window)) for k, window in zip(ks, windows)]
        live = [i for i, k in enumerate(ks) if k > 0]  # the others outgrew the drafter's context: no draft
        for i in live:
            held = self.cached[rows[i]]
            same = _common_prefix(held, windows[i], len(windows[i]) - 1)  # at least the last token is fed
            self.cached[rows[i]] = held[:same]
            self.cache.lengths[rows[i]] = same
        if not live:
            return out
        logits = self._feed([rows[i] for i in live], [windows[i][len(self.cached[rows[i]]):] for i in live])
        for i in live:
            self.cached[rows[i]] = list(windows[i])
        drafts: list[list[int]] = [[] for _ in live]
        qs: list[list[torch.Tensor]] = [[] for _ in live]
        going = list(range(len(live)))  # positions in ``live`` of the rows still drafting
        while True:
            for j, at in enumerate(going):
                seq = seqs[live[at]]
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
            logits = self._feed([rows[live[at]] for at in going], [[drafts[at][-1]] for at in going])
            for at in going:
                self.cached[rows[live[at]]].append(drafts[at][-1])
        for at, i in enumerate(live):
            out[i] = (drafts[at], qs[at] or None)
        return out

    def _feed(self, rows: list[int], tails: list[list[int]]) -> torch.Tensor:
        """Append ``tails[i]`` to cache row ``rows[i]``; the logits [len(rows), V] after each tail's last token."""
        device = self.cache.k.device
        top = max(rows) + 1
        view = self.cache.rows(0, top)
        width = max(len(t) for t in tails)
        if int(view.lengths.max()) + width > self.max_len:  # the padded batch would run past a full row
            out = []
            for row, tail in zip(rows, tails):
                hidden = self.model.hidden_states(torch.tensor([tail], device=device), self.cache.rows(row, row + 1))
                out.append(self.model.logits(hidden[0, -1]))
            return torch.stack(out).float()
        ids = torch.zeros(top, width, dtype=torch.long, device=device)
        lengths = torch.ones(top, dtype=torch.long, device=device)
        for row, tail in zip(rows, tails):
            ids[row, : len(tail)] = torch.tensor(tail)
            lengths[row] = len(tail)
        saved = view.lengths.clone()
        hidden = self.model.hidden_states(ids, view, input_lengths=lengths)  # (top, width, C)
        fed = torch.zeros(top, dtype=torch.bool, device=device)
        fed[rows] = True
        view.lengths.copy_(torch.where(fed, view.lengths, saved))  # the dummy rows keep their length
        index = torch.tensor(rows, device=device)
        return self.model.logits(hidden[index, lengths[index] - 1]).float()


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
