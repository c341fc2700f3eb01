"""``scratchlm serve MODEL``: the OpenAI-compatible server on uvicorn (registered in cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse
import logging
import os

from scratchlm.cli_options import (
    add_context_shift_flags,
    add_draft_flags,
    add_engine_flags,
    add_model_argument,
    decoding_kwargs,
    engine_kwargs,
)
from scratchlm.errors import ConfigError, ScratchLMError

API_KEY_ENV = "SCRATCHLM_API_KEY"
TEST_MODEL = "test-model"  # serve/test_model.py's name, written here so that parsing never imports torch
DEFAULT_BUDGET_MB = 256.0  # prefix_cache.DEFAULT_BUDGET_MB, written here so that parsing never imports torch (tested)


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API with a chat page",
                              description="Serve a model over an OpenAI-compatible HTTP API with a chat page. MODEL "
                              f"{TEST_MODEL!r} is a tiny built-in stand-in that loads no file, starts at once and "
                              "always gives the same reply: for developing and testing clients.")
    add_model_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help=f"require this key on every route but /health (default: ${API_KEY_ENV}; none if unset)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a batch slot; more are answered 429 (default 64)")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens per request, prompt + completion (default: the model's context, at most 2048)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the model's name)")
    p.add_argument("--prefix-cache-mb", type=float, default=DEFAULT_BUDGET_MB, metavar="MB",
                   help="memory for the keys and values of earlier prompts, reused by requests that start the same "
                        f"way (a system prompt, a chat so far); least recently used blocks go first (default "
                        f"{DEFAULT_BUDGET_MB:g}; 0: off)")
    p.add_argument("--log-prompts", action="store_true", help="include prompts in the access log")
    p.add_argument("--embedding-model", default=None, metavar="ENCODER",
                   help="answer /v1/embeddings with this encoder (e.g. all-minilm-l6-v2) instead of MODEL")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve a LoRA adapter (PEFT directory, as finetune writes) beside the base model under NAME; "
                        "repeatable; requests choose with their model field and are batched together. A bare DIR is "
                        "merged into the base at load instead")
    add_engine_flags(p, adapter=False)
    add_context_shift_flags(add_draft_flags(p))
    p.set_defaults(func=cmd_serve)


def load_model(args: argparse.Namespace):
    """The one place the server loads its model (flags that change loading belong here)."""
    from scratchlm.llm import LLM

    if args.model == TEST_MODEL:
        from scratchlm.serve.test_model import build_test_model

        return build_test_model()
    from scratchlm.serve.adapters import parse_adapter_specs

    # the one --adapter DIR merged into the base (NAME=DIR adapters are served beside it, not loaded here)
    given = getattr(args, "adapter", None) or []
    _, merged = parse_adapter_specs([given] if isinstance(given, str) else given)
    return LLM.load(args.model, **{**engine_kwargs(args), "adapter": merged})


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from scratchlm.hub import resolve
    from scratchlm.serve.adapters import parse_adapter_specs
    from scratchlm.serve.app import create_app
    from scratchlm.serve.background import GRACEFUL_SHUTDOWN_S, Server

    for name in ("max_batch", "max_queue", "port"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive number")
    if args.max_len is not None and args.max_len < 2:
        raise ConfigError("--max-len must be at least 2")
    if args.prefix_cache_mb < 0:
        raise ConfigError("--prefix-cache-mb must be 0 (off) or a positive number of megabytes")
    if args.model != TEST_MODEL:
        resolve(args.model)  # an unknown name or missing file fails here, before the server starts
    # --draft, --draft-tokens, --context-shift, --keep: checked here; a draft model loads with the model
    decoding = decoding_kwargs(args)
    if decoding.get("draft") not in (None, "ngram"):
        resolve(decoding["draft"])
    adapters, args.merged_adapter = parse_adapter_specs(args.adapter)
    embeddings = None
    if args.embedding_model is not None:
        from scratchlm.encoder import Encoder
        from scratchlm.serve.embeddings import EmbeddingService

        resolve(args.embedding_model)
        embeddings = EmbeddingService(lambda: Encoder.load(args.embedding_model),
                                      on_load_error=lambda exc: on_load_error(exc))  # defined below
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("scratchlm.serve")
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("warning: listening on %s without an API key: anyone who can reach it can use the model "
                    "(set --api-key or $%s)", args.host, API_KEY_ENV)
    failure: list[BaseException] = []

    def on_load_error(exc: BaseException) -> None:
        failure.append(exc)
        server.should_exit = True

    app = create_app(lambda: load_model(args), api_key=api_key, max_batch=args.max_batch,
                     max_queue=args.max_queue, max_len=args.max_len, log_prompts=args.log_prompts,
                     model_name=args.model_name, on_load_error=on_load_error, embeddings=embeddings,
                     prefix_cache_mb=args.prefix_cache_mb, adapters=adapters, **decoding)
    # uvicorn's own access log is off: the server writes one structured line per request instead.
    # On SIGTERM or Ctrl-C, Server ends the requests in flight first, so the process exits within a second.
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, access_log=False, log_level="info",
                                   timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    log.info("scratchlm serve: http://%s:%d/ (chat page), OpenAI API at /v1; loading %s ...",
             args.host, args.port, args.model)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: the shutdown was clean
        pass
    if failure:
        # With --embedding-model two models load at once: let the other finish before the interpreter exits
        # (exiting while a thread is inside torch aborts the process instead of printing the error).
        import threading

        for thread in threading.enumerate():
            if thread.name in ("scratchlm-load", "scratchlm-embeddings"):
                thread.join(timeout=300)
        exc = failure[0]
        raise exc if isinstance(exc, ScratchLMError) else ScratchLMError(f"could not load the model: {exc}")
