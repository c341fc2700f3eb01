"""``POST /v1/embeddings`` answered by an encoder model (``scratchlm serve MODEL --embedding-model NAME``).

One server then answers chat with its language model and embeddings with a sentence encoder such as
all-MiniLM-L6-v2, as a RAG application needs. The encoder loads in a thread at start (503 until it is ready),
and one worker thread embeds: requests that arrive while it is busy wait in a queue and are embedded
together in the next forward passes (batched across requests, shortest inputs together).

Inputs follow OpenAI's schema: a text, a list of texts, a list of token ids or a list of such lists. Token ids are
the encoder's WordPiece ids; ``[CLS]`` and ``[SEP]`` are added unless the list already starts and ends with them.
An input longer than the encoder's ``max_tokens`` is cut to it, as sentence-transformers does (the usage counts
the tokens actually embedded: [CLS] and [SEP] included).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from scratchlm.serve.jobs import ApiError, prompt_list, validate_model
from scratchlm.serve.schemas import EmbeddingRequest, embedding_item

log = logging.getLogger("scratchlm.serve")
MAX_INPUTS_PER_PASS = 256  # inputs embedded in one call of the worker (several requests' worth)


@dataclass
class _Job:
    inputs: list[list[int]]
    finish: Callable[[object], None]  # called once, from the worker thread, with the vectors or an exception
    cancelled: bool = field(default=False)


class EmbeddingService:
    """An encoder served at /v1/embeddings: ``start()`` loads it in a thread, ``respond(body)`` answers."""

    def __init__(self, load: Callable[[], object], name: str | None = None, batch_size: int = 32,
                 on_load_error: Callable[[BaseException], None] | None = None):
        self.load = load
        self.on_load_error = on_load_error
        self.name = name
        self.batch_size = batch_size
        self.encoder = None
        self.load_error: str | None = None
        self._queue: queue.Queue[_Job | None] = queue.Queue()

    def start(self) -> EmbeddingService:
        threading.Thread(target=self._run, name="scratchlm-embeddings", daemon=True).start()
        return self

    def stop(self) -> None:
        self._queue.put(None)

    def ready(self):
        """The loaded encoder, or a 503 that says why not."""
        if self.encoder is None:
            if self.load_error:
                raise ApiError(503, f"the embedding model failed to load: {self.load_error}", type="server_error",
                               code="model_load_failed")
            raise ApiError(503, "the embedding model is still loading: retry in a few seconds", type="server_error",
                           code="model_loading")
        return self.encoder

    def card(self) -> dict | None:
        """The /v1/models entry of the encoder (None until it is loaded)."""
        if self.encoder is None:
            return None
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "scratchlm",
                "context_length": self.encoder.max_tokens, "max_model_len": self.encoder.max_tokens,
                "embedding_dimensions": self.encoder.dim}

    # ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            encoder = self.load()
            encoder.embed(["warm-up"])  # builds the tokenizer's character tables (~1 s) before the first request
            self.name = self.name or encoder.name
            self.encoder = encoder
            log.info("embedding model %s ready (%d dimensions, %d tokens per input)", self.name, encoder.dim,
                     encoder.max_tokens)
        except BaseException as exc:  # reported by every /v1/embeddings request
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("loading the embedding model failed: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(exc)
            return
        while (job := self._queue.get()) is not None:
            jobs = [job]
            count = len(job.inputs)
            while count < MAX_INPUTS_PER_PASS:  # take every request already waiting: one batched pass for all
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                jobs.append(more)
                count += len(more.inputs)
            jobs = [j for j in jobs if not j.cancelled]
            try:
                vectors = encoder.embed_ids([ids for j in jobs for ids in j.inputs], batch_size=self.batch_size)
            except Exception as exc:  # noqa: BLE001 - the requests answer 500 with the reason; the worker goes on
                log.exception("embedding failed")
                for j in jobs:
                    j.finish(exc)
                continue
            start = 0
            for j in jobs:
                j.finish(vectors[start:start + len(j.inputs)])
                start += len(j.inputs)

    async def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        """The vectors of prepared inputs, computed by the worker thread together with other requests'."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def finish(result) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

        job = _Job(inputs, finish)
        self._queue.put(job)
        try:
            result = await done
        finally:
            job.cancelled = True  # a client that left costs nothing more once its turn comes
        if isinstance(result, Exception):
            raise ApiError(500, f"embedding failed: {type(result).__name__}: {result}", type="server_error")
        return result

    async def respond(self, body: EmbeddingRequest) -> tuple[dict, int]:
        """The OpenAI answer to ``body`` and the number of tokens embedded."""
        encoder = self.ready()
        validate_model(body.model, self.name)
        if body.dimensions is not None and body.dimensions != encoder.dim:
            raise ApiError(400, f"dimensions must be {encoder.dim} (this model's embedding size) or unset",
                           param="dimensions")
        inputs = await asyncio.to_thread(embedding_inputs, encoder, prompt_list(body.input, "input"))
        vectors = await self.embed(inputs)
        tokens = sum(len(ids) for ids in inputs)
        return {"object": "list", "data": [embedding_item(i, v, body.encoding_format) for i, v in enumerate(vectors)],
                "model": self.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, tokens


def embedding_inputs(encoder, items: list[str | list[int]]) -> list[list[int]]:
    """Each input as the encoder's ids, ``[CLS] ... [SEP]`` at most ``max_tokens`` long; bad ids answer 400."""
    tok = encoder.tokenizer
    vocab = encoder.model.config.vocab_size
    texts = [item for item in items if isinstance(item, str)]
    prepared = iter(encoder.prepare(texts)) if texts else iter(())
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(next(prepared))
            continue
        ids = list(item)
        if not ids:
            raise ApiError(400, f"input[{i}] is an empty list of token ids", param="input")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"input[{i}] holds token id {bad}, outside this model's vocabulary (0..{vocab - 1})",
                           param="input")
        if len(ids) >= 2 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id:
            ids = ids[1:-1]
        out.append(tok.with_special_tokens(ids, encoder.max_tokens))
    return out
