"""The HTTP server: OpenAI's routes on FastAPI, answered by the engine.

    GET  /health               liveness and readiness (never needs the key)
    GET  /metrics              Prometheus text
    GET  /v1/models            the served model and its LoRA adapters (a request's ``model`` picks one)
    POST /v1/completions       text completion (stream: server-sent events ending in "data: [DONE]")
    POST /v1/chat/completions  chat completion (same streaming)
    POST /v1/embeddings        the encoder's sentence embeddings with --embedding-model (serve/embeddings.py),
                               else the language model's mean-pooled, L2-normalised final hidden states
    GET  /                     the web chat page (static files in ./static)

The server listens at once and loads the model in a thread; until it is ready, model routes answer 503.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from scratchlm.errors import ScratchLMError
from scratchlm.serve import jobs as J
from scratchlm.serve.answers import Answer, stream_events
from scratchlm.serve.embeddings import EmbeddingService
from scratchlm.serve.engine import Engine, QueueFullError
from scratchlm.serve.events import Event
from scratchlm.serve.metrics import ServerMetrics
from scratchlm.serve.middleware import RequestMiddleware
from scratchlm.serve.prefix_cache import DEFAULT_BUDGET_MB
from scratchlm.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    embedding_item,
    error_body,
)

log = logging.getLogger("scratchlm.serve")
STATIC = Path(__file__).parent / "static"
# The chat page runs only its own script file: no inline script, no event-handler attributes, no other origin.
PAGE_HEADERS = {
    "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
}


class ServerState:
    """The model, its engine, and the settings the routes need."""

    def __init__(self, load: Callable[[], object], engine_options: dict, model_name: str | None,
                 on_load_error: Callable[[BaseException], None] | None = None, adapters: dict | None = None):
        self.load, self.engine_options, self.model_name = load, engine_options, model_name
        self.on_load_error = on_load_error
        self.adapter_dirs = adapters or {}  # name -> LoRA adapter directory, served beside the base
        self.adapters = None  # their ServedAdapters once loaded
        self.metrics = ServerMetrics()
        self.llm = None
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.runs: set[_Run] = set()  # requests in flight, ended at once by stop_requests on shutdown

    def stop_requests(self, reason: str = "the server is shutting down: retry the request") -> None:
        """End every request in flight now (streams get an error event, then ``[DONE]``), so that the server
        exits at once instead of waiting for each answer to finish. Called in the event loop's thread."""
        for run in list(self.runs):
            run.stop(reason)

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="scratchlm-load", daemon=True).start()

    def _load(self) -> None:
        try:
            llm = self.load()
            self.model_name = self.model_name or llm.name
            if self.adapter_dirs:
                from scratchlm.serve.adapters import ServedAdapters

                self.adapters = ServedAdapters(llm.model, self.adapter_dirs, self.model_name)
                log.info("LoRA adapters: %s", ", ".join(self.adapters.names[1:]))
            self.llm = llm
            self.engine = Engine(llm, metrics=self.metrics, adapters=self.adapters, **self.engine_options).start()
            log.info("model %s ready (max batch %d, max queue %d, %d tokens per slot)", self.model_name,
                     self.engine.max_batch, self.engine.max_queue, self.engine.max_len)
        except BaseException as exc:  # reported by /health; the CLI exits
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("loading the model failed: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(exc)

    def model_names(self) -> list[str]:
        return self.adapters.names if self.adapters is not None else [self.model_name]

    def adapter_index(self, name: str) -> int:
        """A request's ``model``: 0 for the base, i for adapter i; 404 with the served names otherwise."""
        index = self.adapters.index(name) if self.adapters is not None else (0 if name == self.model_name else None)
        if index is None:
            served = ", ".join(repr(n) for n in self.model_names())
            raise J.ApiError(404, f"The model '{name}' does not exist; this server serves {served}", param="model",
                             code="model_not_found")
        return index

    def ready(self) -> Engine:
        if self.engine is None:
            if self.load_error:
                raise J.ApiError(503, f"the model failed to load: {self.load_error}", type="server_error",
                                 code="model_load_failed")
            raise J.ApiError(503, "the model is still loading: retry in a few seconds", type="server_error",
                             code="model_loading")
        return self.engine


def create_app(model, *, api_key: str | None = None, max_batch: int = 16, max_queue: int = 64,
               max_len: int | None = None, prefill_chunk: int = 128, log_prompts: bool = False,
               model_name: str | None = None, on_load_error: Callable[[BaseException], None] | None = None,
               embeddings: EmbeddingService | None = None, prefix_cache_mb: float = DEFAULT_BUDGET_MB,
               adapters: dict | None = None, draft=None, draft_tokens: int | None = None,
               context_shift: str | bool | None = None, keep: int | None = None) -> FastAPI:
    """The server app. ``model`` is an ``LLM`` or a function that loads one (called in a thread at start);
    ``embeddings``, an encoder that answers /v1/embeddings instead of the language model; ``prefix_cache_mb``,
    memory for the keys and values of earlier prompts (0: off); ``adapters``, {name: LoRA adapter directory}
    served beside the base model, each request applying the one its ``model`` names (serve/adapters.py);
    ``draft`` ("ngram", a draft model name or path, or an LLM) and ``draft_tokens``: speculative decoding for every
    request; ``context_shift`` and ``keep``: requests go on past the context window (docs/decoding.md)."""
    load = model if callable(model) and not hasattr(model, "tokenizer") else (lambda: model)
    state = ServerState(load, dict(max_batch=max_batch, max_queue=max_queue, max_len=max_len,
                                   prefill_chunk=prefill_chunk, prefix_cache_mb=prefix_cache_mb, draft=draft,
                                   draft_tokens=draft_tokens, context_shift=context_shift, keep=keep), model_name,
                        on_load_error, adapters)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading()
        if embeddings is not None:
            embeddings.start()
        yield
        if state.engine is not None:
            state.engine.stop()
        if embeddings is not None:
            embeddings.stop()

    app = FastAPI(title="scratchlm", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="An OpenAI-compatible API for a scratchlm model.")
    app.state.server = state
    app.state.embeddings = embeddings
    _add_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(RequestMiddleware, api_key=api_key, metrics=state.metrics, log_prompts=log_prompts)
    return app


def _error(status: int, message: str, **fields) -> JSONResponse:
    return JSONResponse(error_body(message, **fields), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(J.ApiError)
    async def api_error(request: Request, exc: J.ApiError):
        return _error(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)

    @app.exception_handler(ScratchLMError)
    async def user_error(request: Request, exc: ScratchLMError):
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        where = _field_path(first.get("loc", ()))
        message = first.get("msg", "invalid value")
        if sum(_field_path(e.get("loc", ())) == where for e in exc.errors()) > 1:  # a union: several forms
            message += " (or one of the other accepted forms)"
        return _error(400, f"invalid request: {where or 'body'}: {message}", param=where or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return _error(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):
        log.exception("unhandled error")
        return _error(500, f"internal server error: {type(exc).__name__}", type="server_error")


def _field_path(loc) -> str:
    """``("body", "stop", "list[str]", 0)`` -> ``"stop.0"``: pydantic puts union member names in locations."""
    return ".".join(str(p) for p in loc if p != "body" and not (isinstance(p, str) and (
        "[" in p or p in ("str", "int", "float", "bool", "dict") or p.startswith("function"))))


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", summary="readiness: 200 when the model (and the embedding model) is loaded, 503 before")
    async def health():
        encoder = app.state.embeddings
        if state.engine is None or (encoder is not None and encoder.encoder is None):
            error = state.load_error or (encoder is not None and encoder.load_error
                                         and f"the embedding model failed to load: {encoder.load_error}")
            return JSONResponse({"status": "failed" if error else "loading",
                                 **error_body(error or "loading", "server_error")}, status_code=503)
        extra = {"embedding_model": encoder.name} if encoder is not None else {}
        return {"status": "ok", "model": state.model_name, **extra, **state.engine.stats()}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        state.ready()
        encoder = app.state.embeddings.card() if app.state.embeddings is not None else None
        cards = [_model_card(state, name) for name in state.model_names()]
        return {"object": "list", "data": cards + ([encoder] if encoder else [])}

    @app.get("/v1/models/{model}")
    async def get_model(model: str):
        state.ready()
        if app.state.embeddings is not None and model == app.state.embeddings.name and app.state.embeddings.card():
            return app.state.embeddings.card()
        state.adapter_index(model)
        return _model_card(state, model)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        engine = state.ready()
        adapter = state.adapter_index(body.model)
        items = J.prompt_list(body.prompt, "prompt")
        prompts = await run_in_threadpool(J.encode_prompts, state.llm, items, "prompt")
        jobs = J.generation_jobs(body, prompts, engine.max_len, engine.max_batch + engine.max_queue,
                                 shift=engine.shift is not None)
        for job in jobs:
            job.adapter = adapter
        _note(request, body, prompts, items)
        answer = Answer(state, "text_completion", body, prompts, items)
        return await _respond(request, engine, jobs, answer)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        engine = state.ready()
        adapter = state.adapter_index(body.model)
        prompt = await run_in_threadpool(J.encode_chat, state.llm, body)
        jobs = J.generation_jobs(body, [prompt], engine.max_len, engine.max_batch + engine.max_queue,
                                 shift=engine.shift is not None)
        for job in jobs:
            job.adapter = adapter
        _note(request, body, [prompt], J.chat_messages(body))
        answer = Answer(state, "chat.completion", body, [prompt], None)
        return await _respond(request, engine, jobs, answer)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        if app.state.embeddings is not None:  # the encoder answers (serve/embeddings.py)
            answer, tokens = await app.state.embeddings.respond(body)
            request.state.log.update(model=body.model, prompt_tokens=tokens, inputs=len(answer["data"]))
            return answer
        engine = state.ready()
        adapter = state.adapter_index(body.model)
        inputs = await run_in_threadpool(J.embedding_inputs, state.llm, body, engine.max_len)
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def sink(result):
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

        try:
            ticket = engine.embed(inputs, sink, adapter)
        except QueueFullError as exc:
            raise J.ApiError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded") from None
        try:
            result = await done
        finally:
            engine.cancel(ticket)  # no-op when finished; frees the queue if the client left
        if isinstance(result, Exception):
            raise J.ApiError(500, str(result), type="server_error")
        tokens = sum(len(x) for x in inputs)
        request.state.log.update(model=body.model, prompt_tokens=tokens, inputs=len(inputs))
        return {"object": "list", "model": body.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [embedding_item(i, v, body.encoding_format) for i, v in enumerate(result)]}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def _model_card(state: ServerState, name: str) -> dict:
    """An OpenAI model object; an adapter's names its base in ``parent`` and its directory in ``root``, as vLLM's."""
    cfg = state.llm.model.config
    card = {"id": name, "object": "model", "created": 0, "owned_by": "scratchlm",
            "context_length": state.engine.max_len, "max_model_len": state.engine.max_len,
            "embedding_dimensions": cfg.d_model}
    if name != state.model_name:
        card.update(parent=state.model_name, root=str(state.adapters.sources[name]))
    return card


def _note(request: Request, body, prompts: list[list[int]], prompt_for_log) -> None:
    request.state.log.update(model=body.model, stream=body.stream, n=body.n,
                             prompt_tokens=sum(len(p) for p in prompts), prompt=prompt_for_log)


async def _respond(request: Request, engine: Engine, jobs: list, answer: Answer):
    """Submit the jobs; answer with one JSON body, or with server-sent events when streaming."""
    run = _Run(engine, jobs, request.app.state.server.runs)
    if answer.body.stream:
        return StreamingResponse(stream_events(run, answer, request.state.log), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(_watch_disconnect(request, run))
    try:
        async for event in run.events():
            answer.add(event)
    finally:
        watcher.cancel()
        gone = run.gone
        run.close()
    if gone:
        return _error(499, "the client closed the connection")  # nobody reads this; the log does
    if answer.error:
        raise J.ApiError(500, answer.error, type="server_error")
    request.state.log.update(answer.log_fields())
    return answer.response()


class _Run:
    """Jobs submitted to the engine, with their events delivered to this event loop in order."""

    GONE, STOP = object(), object()

    def __init__(self, engine: Engine, jobs: list, registry: set | None = None):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.engine, self.open, self.gone = engine, len(jobs), False
        self.registry = registry if registry is not None else set()

        def sink(event):
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: the server is stopping
                pass

        try:
            self.ticket = engine.submit(jobs, sink)
        except QueueFullError as exc:
            raise J.ApiError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded") from None
        self.registry.add(self)

    def stop(self, reason: str) -> None:
        """Cancel the jobs; ``events`` delivers what was already made, then one error event, and ends."""
        if self.open:
            self.engine.cancel(self.ticket)
            self.queue.put_nowait((self.STOP, reason))

    async def events(self):
        while self.open:
            event = await self.queue.get()
            if event is self.GONE:
                return
            if isinstance(event, tuple) and event[0] is self.STOP:
                self.open = 0
                yield Event(0, finish_reason="error", error=event[1])
                return
            if event.finish_reason is not None:
                self.open -= 1
            yield event

    def close(self) -> None:
        self.registry.discard(self)
        if self.open:
            self.engine.cancel(self.ticket)
            self.open = 0


async def _watch_disconnect(request: Request, run: _Run) -> None:
    """For answers that are not streamed: notice a client that leaves, and stop its work at once."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            run.gone = True
            run.close()
            run.queue.put_nowait(_Run.GONE)
            return

