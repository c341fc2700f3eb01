"""The scheduler: one worker thread runs the model for every request at once (continuous batching).

One ``KVCache`` holds ``max_batch`` rows; each row is a *slot* that one request occupies from its prefill to
its last token. The worker loops:

    admit waiting requests into free slots
    -> prefill: at most ``prefill_chunk`` prompt tokens (more when nothing decodes) of joining requests,
       after copying the longest prompt prefix that the prefix cache (``prefix_cache.py``: the prompt blocks of
       earlier and running requests) or another running request already holds (a shared system prompt)
    -> decode: one token for every request past its prefill, all rows in one forward pass (with ``--draft``,
       each row's drafted tokens too: ``speculative_step.py``; with ``--context-shift``, a row whose cache is
       full first drops the oldest half of its tokens after the first ``keep``: ``generate.shift_context``)
    -> embeddings: at most ``prefill_chunk`` tokens of waiting embedding inputs (``embed_step.py``)

so requests join and leave between steps, and a long prompt is prefilled in chunks between decode steps
instead of stalling the streams already running (Yu et al. 2022, "Orca", iteration-level scheduling;
chunked prefill as in Agrawal et al. 2023, "Sarathi").

Each request keeps its own ``generate.Sequence`` (sampling settings, seeded generator, stop logic), so its
tokens are the ones it would get alone. The event loop never touches the model: it hands jobs in with
``submit`` and gets ``Event``s back through a callback, which it makes thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from scratchlm.errors import ConfigError
from scratchlm.generate import ContextShift, Sequence, shift_context
from scratchlm.quant.quantize import return_freed_memory
from scratchlm.serve.embed_step import EmbedJob, embed_some
from scratchlm.serve.events import Event, GenerationJob, QueueFullError, Ticket, TokenLogprob, token_logprob
from scratchlm.serve.kv_rows import bucket_windows, lazy_kv_cache, static_window
from scratchlm.serve.metrics import ServerMetrics
from scratchlm.serve.prefix_cache import DEFAULT_BUDGET_MB, PrefixCache, reuse_prefix, shared_prefix
from scratchlm.serve.speculative_step import speculative_step

__all__ = ["Engine", "Event", "GenerationJob", "QueueFullError", "Ticket", "TokenLogprob", "shared_prefix"]
log = logging.getLogger("scratchlm.serve")

MIN_SHARED = 8  # a joiner sharing this many prompt tokens with one being prefilled waits a step to copy them
IDLE_PREFILL_FACTOR = 8  # prefill budget multiplier when no request is decoding (nobody to keep waiting)
DEFAULT_MAX_LEN = 2048  # KV cache positions per slot unless told otherwise (float32 SmolLM2: 94 MB per slot, of
# which only the positions that requests reach are ever touched: serve/kv_rows.py)


class _Active:
    """A job inside the engine: waiting, prefilling (``done`` < prompt length) or decoding."""

    def __init__(self, job: GenerationJob, ticket: Ticket, seq: Sequence):
        self.job, self.ticket, self.seq = job, ticket, seq
        self.slot = -1
        self.done = 0  # prompt tokens already in the cache
        self.next_token = 0  # the token to feed at the next decode step
        self.generated = 0  # tokens sampled, an end-of-sequence token included
        self.held: list[TokenLogprob] = []  # logprobs of tokens whose text is not released yet
        self.prompt_lp: list[TokenLogprob] = []
        self.cached = 0  # prompt tokens copied from the prefix cache or another request instead of computed
        self.policy = None  # its speculative.DraftLength, with --draft
        self.arrived = time.perf_counter()
        self.last_token_at = 0.0
        # After a context shift the row caches ``head`` (the tokens kept) followed by the tokens from position
        # ``head_end`` of prompt + output on; before any, the row caches prompt + output from position 0.
        self.head: list[int] = []
        self.head_end = 0

    @property
    def prefilling(self) -> bool:
        return self.done < len(self.job.prompt_ids)

    @property
    def cached_prompt(self) -> list[int]:
        """The prompt tokens whose keys and values sit at their own positions in the row (another request with the
        same prompt start may copy them): those prefilled so far, none once a context shift has moved them."""
        return [] if self.seq.shifts else self.job.prompt_ids[: self.done]

    def window(self) -> list[int]:
        """The tokens the row caches while decoding: everything but the newest token (chosen, not yet fed)."""
        fed = self.seq.prompt_ids + self.seq.output_ids[:-1]
        return self.head + fed[self.head_end:] if self.seq.shifts else fed


class Engine:
    """Runs generation and embedding jobs for many clients in one batch, on one worker thread."""

    def __init__(self, llm, max_batch: int = 16, max_queue: int = 64, max_len: int | None = None,
                 prefill_chunk: int = 128, metrics: ServerMetrics | None = None,
                 prefix_cache_mb: float = DEFAULT_BUDGET_MB, adapters=None, draft=None,
                 draft_tokens: int | None = None, context_shift: str | bool | None = None, keep: int | None = None):
        """``prefix_cache_mb``: memory for the keys and values of past prompts (0: only running requests share);
        ``adapters``: the ``serve.adapters.ServedAdapters`` attached to the model (a job's ``adapter`` indexes them);
        ``draft``: speculative decoding for every request, ``"ngram"`` or a draft model (``LLM.draft_model``),
        at most ``draft_tokens`` drafted per step; ``context_shift`` (True, "recompute" or "rotate") and ``keep``
        (implies a shift): a request goes on past the ``max_len`` tokens of its slot, limited only by its
        ``max_tokens`` (docs/decoding.md)."""
        self.llm, self.model = llm, llm.model
        cfg = self.model.config
        self.max_len = min(max_len or DEFAULT_MAX_LEN, cfg.context_length)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.shift = None
        if context_shift or keep is not None:
            self.shift = ContextShift(0 if keep is None else keep,
                                      context_shift if isinstance(context_shift, str) else "recompute")
            if self.shift.keep > self.max_len // 2:
                raise ConfigError(f"--keep {self.shift.keep} is more than half of the {self.max_len} tokens of a "
                                  f"slot: a context shift must free room; keep at most {self.max_len // 2} tokens")
        self.adapters = adapters
        self.metrics = metrics or ServerMetrics()
        param = next(self.model.parameters())
        self.device = param.device
        self.cache = lazy_kv_cache(cfg, max_batch, self.max_len, param.dtype, param.device)
        self.prefix_cache = PrefixCache(cfg, prefix_cache_mb, dtype=self.cache.k.dtype, device=param.device) \
            if prefix_cache_mb else None
        self.drafter = None
        if draft is not None:
            from scratchlm.generate import make_drafter
            from scratchlm.speculative import DEFAULT_DRAFT_TOKENS, check_draft_tokens

            check_draft_tokens(draft_tokens)
            self.draft_tokens = draft_tokens or DEFAULT_DRAFT_TOKENS["ngram" if draft == "ngram" else "model"]
            self.drafter = make_drafter(llm.draft_model(draft), self.model, max_batch, self.max_len)
        self.slots: list[_Active | None] = [None] * max_batch
        # Loading freed many temporaries that glibc keeps in the process: give them back before serving (SmolLM2
        # from its GGUF: 462 -> 384 MiB resident, measured).
        return_freed_memory()
        self._waiting: deque[_Active] = deque()
        self._embeds: deque[EmbedJob] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="scratchlm-engine", daemon=True)

    # ---- the event loop's side --------------------------------------------------------------------
    def start(self) -> Engine:
        self._prepare_compiled_steps()
        self._thread.start()
        return self

    def _prepare_compiled_steps(self) -> None:
        """With a compiled decode step attached (``LLM.load``'s default for int4 models on a CPU), ask a background
        process for the packages of the decode windows the first requests will use: each row bucket (1, 2, 4, ...
        ``max_batch`` rows, see ``static_window``) at the shortest cache window. Until a package is on disk those
        steps run eagerly, so no request waits for a compile; the decoder asks for longer windows itself when a row
        first reaches them. Adapter rows never use the compiled step (its graphs know nothing of them). With
        ``--compile`` (which in ``generate`` builds a missing package and waits) the server builds in the background
        too: a request never waits for the compiler."""
        decoder = getattr(self.model, "decoder", None)
        prepare = getattr(decoder, "prepare_in_background", None)
        if prepare is None or self.adapters is not None:
            return
        if getattr(decoder, "recipe", None) is not None:
            decoder.background = True
        try:
            prepare(bucket_windows(self.cache, self.max_batch))
        except (ValueError, OSError) as exc:  # a model not loaded by LLM.load, a read-only home: decode as it comes
            log.info("scratchlm serve: compiled decode steps not prepared in the background (%s)", exc)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def sequence(self, job: GenerationJob) -> Sequence:
        """The ``Sequence`` a job decodes with (raises ContextLengthError when it cannot fit)."""
        cfg = self.model.config
        return Sequence(job.prompt_ids, job.params, self.llm.tokenizer, self.llm.eos_ids, cfg.vocab_size,
                        self.max_len, context_shift=self.shift is not None)

    def submit(self, jobs: list[GenerationJob], sink: Callable[[Event], None]) -> Ticket:
        """Queue jobs; ``sink`` receives their Events from the worker thread. Raises QueueFullError."""
        ticket = Ticket(sink)
        actives = [_Active(job, ticket, self.sequence(job)) for job in jobs]
        with self._cond:
            free = sum(s is None for s in self.slots)
            if len(self._waiting) + len(actives) > self.max_queue + free:
                raise QueueFullError(f"the server is busy ({len(self._waiting)} requests waiting): retry later")
            self._waiting.extend(actives)
            self.metrics.record(self.metrics.queue_depth.set, len(self._waiting))
            self._cond.notify()
        return ticket

    def embed(self, inputs: list[list[int]], sink: Callable[[list[torch.Tensor] | Exception], None],
              adapter: int = 0) -> Ticket:
        """Queue token lists to embed (with the base model or adapter ``adapter``); ``sink`` receives one unit vector
        per input (or an exception)."""
        ticket = Ticket(sink)
        with self._cond:
            if len(self._embeds) >= self.max_queue:
                raise QueueFullError("the server is busy (embedding queue full): retry later")
            self._embeds.append(EmbedJob(inputs, ticket, [None] * len(inputs), adapter=adapter))
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop a ticket's jobs (client gone): the worker frees their slots before its next step."""
        ticket.cancelled = True
        with self._cond:
            self._cond.notify()

    def stats(self) -> dict:
        """Slots in use and requests waiting (read without the worker's cooperation: a snapshot)."""
        return {"active": sum(s is not None for s in self.slots), "waiting": len(self._waiting),
                "max_batch": self.max_batch, "max_queue": self.max_queue}

    # ---- the worker thread --------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stopping and not self._has_work():
                    self._cond.wait()
                if self._stopping:
                    return
                self._admit()
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as exc:  # a bug must not take the server down: fail what was running
                log.exception("engine step failed")
                self._fail_all(f"internal error in the engine: {type(exc).__name__}: {exc}")

    def _has_work(self) -> bool:
        return bool(self._waiting or self._embeds or any(self.slots))

    def _admit(self) -> None:
        """Move waiting jobs into free slots, lowest slot first (keeps the decode batch compact)."""
        while self._waiting and self._waiting[0].ticket.cancelled:
            self._waiting.popleft()
        for slot in range(self.max_batch):
            if not self._waiting:
                break
            if self.slots[slot] is None:
                active = self._waiting.popleft()
                active.slot = slot
                self.cache.lengths[slot] = 0
                self.slots[slot] = active
                while self._waiting and self._waiting[0].ticket.cancelled:
                    self._waiting.popleft()
        self._waiting = deque(a for a in self._waiting if not a.ticket.cancelled)
        m = self.metrics
        m.record(m.queue_depth.set, len(self._waiting))
        m.record(m.active.set, sum(s is not None for s in self.slots))

    def _step(self) -> None:
        for active in self.slots:
            if active is not None and active.ticket.cancelled:
                self._release(active)
        prefilling = sorted((a for a in self.slots if a is not None and a.prefilling), key=lambda a: a.arrived)
        if prefilling:
            self._prefill(prefilling, others_decoding=any(a is not None and not a.prefilling for a in self.slots))
        decoding = [a for a in self.slots if a is not None and not a.prefilling]
        if decoding:
            self._decode(decoding)
        if self._embeds:
            embed_some(self)

    def _release(self, active: _Active) -> None:
        self.slots[active.slot] = None
        self.cache.lengths[active.slot] = 0  # an idle row sits at position 0 so it never outgrows its buffer

    def _emit(self, active: _Active, event: Event) -> None:
        try:
            active.ticket.sink(event)
        except Exception:  # the client side is gone; nothing left to tell
            active.ticket.cancelled = True

    # ---- prefill ------------------------------------------------------------------------------------
    def _prefill(self, joining: list[_Active], others_decoding: bool) -> None:
        """Feed the next prompt tokens of the oldest joining requests.

        At most ``prefill_chunk`` tokens per step while other requests are decoding, so that their streams
        pause only briefly; more when nobody waits on a decode step. Joiners in adjacent slots run as one
        right-padded batch on a view of those cache rows: nothing is copied.
        """
        budget = self.prefill_chunk * (1 if others_decoding else IDLE_PREFILL_FACTOR)
        chosen, fresh = [], []
        for active in joining:
            if active.done == 0 and not active.job.prompt_logprobs:
                self._reuse_prefix(active)
                if active.done == 0 and any(shared_prefix(active.job.prompt_ids, f.job.prompt_ids) >= MIN_SHARED
                                            and f.job.adapter == active.job.adapter for f in fresh):
                    continue  # wait one step, then copy the prefix that this step computes
            if active.done == 0:
                fresh.append(active)
            n = min(len(active.job.prompt_ids) - active.done, budget)
            chosen.append((active, n))
            budget -= n
            if budget <= 0:
                break
        chosen.sort(key=lambda c: c[0].slot)
        run = [chosen[0]]
        for active, n in chosen[1:]:
            # A run is contiguous slots whose padded batch fits the cache (row start + batch width).
            start, width = max(a.done for a, _ in run), max(m for _, m in run)
            if active.slot == run[-1][0].slot + 1 and max(start, active.done) + max(width, n) <= self.max_len:
                run.append((active, n))
            else:
                self._prefill_run(run)
                run = [(active, n)]
        self._prefill_run(run)

    def _reuse_prefix(self, active: _Active) -> None:
        """Start a joining request from the longest prompt prefix already computed (``prefix_cache.reuse_prefix``)."""
        best = reuse_prefix(active, self.slots, self.cache, self.prefix_cache)
        if best == 0:
            return
        self.cache.lengths[active.slot] = best
        active.done = active.cached = best
        self.metrics.record(self.metrics.reused_tokens.inc, best)

    def _prefill_run(self, group: list[tuple[_Active, int]]) -> None:
        first = group[0][0].slot
        width = max(n for _, n in group)
        ids = torch.zeros(len(group), width, dtype=torch.long, device=self.device)
        for row, (active, n) in enumerate(group):
            ids[row, :n] = torch.tensor(active.job.prompt_ids[active.done: active.done + n])
        lengths = torch.tensor([n for _, n in group], device=self.device)
        view = self.cache.rows(first, first + len(group))
        self._select([active.job.adapter for active, _ in group])
        hidden = self.model.hidden_states(ids, view, input_lengths=lengths)  # (rows, width, C)
        for row, (active, n) in enumerate(group):
            prompt = active.job.prompt_ids
            if active.job.prompt_logprobs:
                # Position p predicts prompt token p + 1; the chunk's last position predicts the next chunk's
                # first token (or, at the end of the prompt, the first generated one: scored below).
                logprobs = self.model.logits(hidden[row, :n]).float().log_softmax(-1)
                top = active.job.logprobs or 0
                for j in range(n):
                    p = active.done + j
                    if p + 1 < len(prompt):
                        active.prompt_lp.append(token_logprob(logprobs[j], prompt[p + 1], top))
            active.done += n
            # The prompt's finished blocks go to the prefix cache at once, for running and later requests. Only
            # prompts: a reply's keys and values come from decode steps, whose arithmetic differs from a prefill's
            # in the last bits (one query against many), and a later request must get exactly what it would get
            # with the cache off; prefill is exact across chunk boundaries, so a reused prefix changes nothing.
            if self.prefix_cache is not None:
                self.prefix_cache.store(prompt[: active.done], self.cache.k[:, active.slot],
                                        self.cache.v[:, active.slot], active.job.adapter)
            if not active.prefilling:
                self.metrics.record(self.metrics.prompt_tokens.inc, len(prompt))
                self._first_token(active, self.model.logits(hidden[row, n - 1]).float())

    def _first_token(self, active: _Active, logits: torch.Tensor) -> None:
        # The first prompt token has no probability: nothing comes before it.
        first = TokenLogprob(active.job.prompt_ids[0], None, [])
        prompt_lp = [first, *active.prompt_lp] if active.job.prompt_logprobs else None
        if active.job.max_tokens == 0:  # scoring only
            self._emit(active, Event(active.job.index, prompt_logprobs=prompt_lp, finish_reason="length",
                                     prompt_tokens=len(active.job.prompt_ids), cached_tokens=active.cached))
            self._release(active)
            return
        self._accept(active, logits, prompt_lp)

    # ---- decode -------------------------------------------------------------------------------------
    def _decode(self, decoding: list[_Active]) -> None:
        """One token for every decoding request. All rows up to the highest busy slot run together (a view,
        so nothing is copied); idle and still-prefilling rows get a dummy token whose cache write lands at
        their own length, a position that later real tokens overwrite, and keep their length."""
        if self.shift is not None:
            for active in decoding:
                if int(self.cache.lengths[active.slot]) + 1 > self.max_len:
                    self._shift(active)
        rows = max(a.slot for a in self.slots if a is not None) + 1
        if self.drafter is not None:
            if speculative_step(self, decoding):
                return
        # The compiled step (scratchlm.compiled), when attached; its graphs know nothing of per-row adapters.
        decoder = getattr(self.model, "decoder", None) if self.adapters is None else None
        if decoder is not None:
            view = static_window(self.cache, rows, self.max_batch)
            rows = view.lengths.shape[0]
        else:
            view = self.cache.rows(0, rows)
        tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        adapter_ids = [0] * rows  # idle and prefilling rows: the base (their dummy token's output is dropped)
        for active in decoding:
            tokens[active.slot, 0] = active.next_token
            adapter_ids[active.slot] = active.job.adapter
        self._select(adapter_ids)
        saved = view.lengths.clone()
        busy = torch.zeros(rows, dtype=torch.bool, device=self.device)
        busy[[a.slot for a in decoding]] = True
        if decoder is not None:
            logits = decoder(tokens, view)[busy]  # (len(decoding), V), in slot order
            view.lengths.copy_(torch.where(busy, view.lengths, saved))
        else:
            hidden = self.model.hidden_states(tokens, view)[:, -1]  # (rows, C)
            view.lengths.copy_(torch.where(busy, view.lengths, saved))
            logits = self.model.logits(hidden[busy]).float()  # (len(decoding), V), in slot order
        m = self.metrics
        m.record(m.batch_size.set, len(decoding))
        m.record(m.batch_sizes.observe, len(decoding))
        for row, active in enumerate(sorted(decoding, key=lambda a: a.slot)):
            if not active.ticket.cancelled:
                self._accept(active, logits[row])
            else:
                self._release(active)

    def _shift(self, active: _Active) -> None:
        """Make room in a full row (``--context-shift``): keep its first ``keep`` tokens, drop the oldest half of
        the rest, and recompute or re-rotate the kept ones (``generate.shift_context``, which touches that row
        only). The prefix cache holds prompt blocks from prefill, before any shift, and a shifted row lends no
        prompt to joiners (``cached_prompt``), so nothing shifted is ever reused as a prompt prefix."""
        self._select([active.job.adapter])  # a recomputing pass runs this row alone, with its adapter
        active.head = shift_context(self.model, self.cache, active.slot, active.window(), self.shift)
        active.head_end = len(active.seq.prompt_ids) + len(active.seq.output_ids) - 1
        active.seq.shifts += 1

    def _select(self, adapter_ids: list[int]) -> None:
        """Tell the adapted layers which adapter each row of the next forward pass applies."""
        if self.adapters is not None:
            self.adapters.select(adapter_ids)

    def _accept(self, active: _Active, logits: torch.Tensor, prompt_lp: list | None = None,
                token: int | None = None) -> None:
        """Sample the next token from ``logits`` [V] (or take ``token``, chosen by speculative verification from
        these logits), record it, and tell the client what it released."""
        seq, job = active.seq, active.job
        if token is None:
            token = seq.next_token(logits)
        entry = None
        if job.logprobs is not None:  # log-probabilities of the model itself, before any sampling filter
            entry = token_logprob(logits.log_softmax(-1), token, job.logprobs)
        text = seq.push(token)
        active.generated += 1
        if entry is not None:
            # Every generated token is listed, an end-of-sequence token included (its text is empty), as
            # OpenAI and vLLM do: the logprob arrays then have exactly usage.completion_tokens entries after
            # the prompt's, which lm-evaluation-harness relies on when it drops the last (generated) entry.
            active.held.append(entry)
        now = time.perf_counter()
        m = self.metrics
        if active.generated == 1:
            m.record(m.ttft.observe, now - active.arrived)
        else:
            m.record(m.itl.observe, now - active.last_token_at)
        active.last_token_at = now
        active.next_token = token
        if not (text or seq.finished or prompt_lp is not None):
            return  # nothing released yet (a partial character, or a possible stop string)
        event = Event(job.index, text, active.held, prompt_logprobs=prompt_lp)
        active.held = []
        if seq.finished:
            event.finish_reason = seq.finish_reason
            event.prompt_tokens, event.completion_tokens = len(job.prompt_ids), active.generated
            event.cached_tokens = active.cached
            m.record(m.completion_tokens.inc, active.generated)
            self._release(active)
        self._emit(active, event)

    def _fail_all(self, message: str) -> None:
        for active in self.slots:
            if active is not None:
                self._emit(active, Event(active.job.index, finish_reason="error", error=message))
                self._release(active)
        while self._embeds:
            job = self._embeds.popleft()
            try:
                job.ticket.sink(RuntimeError(message))
            except Exception:
                pass
