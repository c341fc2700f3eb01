"""``scratchlm rag ...``: ingest, search, ask, summarize, remove, info. STORE is an SQLite file or a postgresql:// URL.

    scratchlm rag ingest docs.db ~/notes --glob "*.md"
    scratchlm rag search docs.db "rotate the API keys" --k 5 --json
    scratchlm rag ask docs.db "How do I rotate the API keys?"
    scratchlm rag summarize report.pdf --method refine

Parsing only: each command calls the functions of ``scratchlm.rag``. This module sits outside the package so
that building the parser does not run ``rag/__init__.py``, which imports torch (`scratchlm --help` stays quick).
"""

from __future__ import annotations

import argparse
import json
import sys

from scratchlm.cli_options import add_progress_flag, show_progress
from scratchlm.errors import ConfigError

DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"


def _warn(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def load_embedder(name: str, progress: bool):
    from scratchlm.encoder import Encoder
    from scratchlm.progress import stage

    with stage(f"loading {name}", progress):
        return Encoder.load(name)


def open_for(args: argparse.Namespace, create: bool):
    """(store, embedder): the store at ``args.store`` with the embedding model that made it (or the one asked for,
    for a new store; asking for another than the store's is refused by ``open_store``)."""
    from scratchlm.rag.store import open_store, stored_model

    recorded = stored_model(args.store)
    if recorded is None and not create:
        from scratchlm.rag.store import StoreError

        raise StoreError(f"no store at {args.store}: create one with `scratchlm rag ingest {args.store} FILES...`")
    name = args.embedding_model or (recorded[0] if recorded else DEFAULT_EMBEDDING_MODEL)
    embedder = load_embedder(name, show_progress(args))
    return open_store(args.store, embedder, create=create), embedder


def parse_where(value: str | None) -> str | None:
    if value is None:
        return None
    key, sep, pattern = value.partition("=")
    if key != "source" or not sep or not pattern:
        raise ConfigError(f"--where {value!r}: give source=GLOB, e.g. --where 'source=*/manuals/*.pdf'")
    # Sources are stored as absolute paths: a relative pattern is taken relative to the current folder.
    if not pattern.startswith(("/", "*")):
        import os

        pattern = os.path.join(os.getcwd(), pattern)
    return pattern


def cmd_ingest(args: argparse.Namespace) -> None:
    from scratchlm.rag.ingest import ingest

    store, embedder = open_for(args, create=True)
    with store:
        report = ingest(store, embedder, args.paths, glob=args.glob, chunk_tokens=args.chunk_tokens,
                        overlap=args.overlap, sync=args.sync, progress=show_progress(args), warn=_warn)
        for _path, reason in report.skipped:
            print(f"skipped: {reason}", file=sys.stderr)
        documents, chunks = store.count()
    print(f"{report.summary()}\n{store.location}: {documents} documents, {chunks} chunks ({embedder.name})")


def cmd_remove(args: argparse.Namespace) -> None:
    from scratchlm.rag.ingest import remove
    from scratchlm.rag.store import open_store, stored_model

    recorded = stored_model(args.store)
    if recorded is None:
        from scratchlm.rag.store import StoreError

        raise StoreError(f"no store at {args.store}")
    with open_store(args.store, model=recorded[0], dim=recorded[1], create=False) as store:
        removed = remove(store, args.paths)
        for source in removed:
            print(f"removed {source}")
        if not removed:
            print("nothing removed: no document under " + ", ".join(args.paths))


def cmd_info(args: argparse.Namespace) -> None:
    from scratchlm.rag.store import StoreError, open_store, stored_model

    recorded = stored_model(args.store)
    if recorded is None:
        raise StoreError(f"no store at {args.store}")
    with open_store(args.store, model=recorded[0], dim=recorded[1], create=False) as store:
        documents, chunks = store.count()
        print(f"store            {store.location}\nembedding model  {recorded[0]} (dimension {recorded[1]})\n"
              f"documents        {documents}\nchunks           {chunks}")
        for source in store.sources():
            print(f"  {source}")


def _rerank_model(args: argparse.Namespace):
    if not args.rerank:
        return None
    from scratchlm.llm import LLM
    from scratchlm.progress import stage

    with stage(f"loading {args.model}", show_progress(args)):
        return LLM.load(args.model)


def cmd_search(args: argparse.Namespace) -> None:
    from scratchlm.rag.search import search

    store, embedder = open_for(args, create=False)
    with store:
        hits = search(store, embedder, args.query, k=args.k, mode=args.mode, where=parse_where(args.where),
                      weights=(args.dense_weight, args.keyword_weight), fusion=args.fusion,
                      rerank=_rerank_model(args), warn=_warn)
    if args.json:
        print(json.dumps([h.to_json() for h in hits], ensure_ascii=False, indent=1))
        return
    if not hits:
        print("no match")
    for n, hit in enumerate(hits, start=1):
        heading = f"  ({hit.heading})" if hit.heading else ""
        print(f"[{n}] {hit.citation()}  chars {hit.start}-{hit.end}  score {hit.score:.4f}{heading}")
        text = " ".join(hit.text.split())
        print(f"    {text[:300]}{' ...' if len(text) > 300 else ''}")


def cmd_ask(args: argparse.Namespace) -> None:
    from scratchlm.llm import LLM
    from scratchlm.progress import stage
    from scratchlm.rag.answer import ask

    store, embedder = open_for(args, create=False)
    with stage(f"loading {args.model}", show_progress(args)):
        llm = LLM.load(args.model)

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with store:
        answer = ask(store, embedder, llm, args.question, k=args.k, mode=args.mode, where=parse_where(args.where),
                     min_similarity=args.min_similarity, max_new_tokens=args.max_new_tokens, on_text=emit,
                     rerank=llm if args.rerank else None, warn=_warn, temperature=args.temperature)
    sys.stdout.write("\n")
    if answer.found:
        sources = answer.sources()
        if answer.citation_numbers:
            print("\nSources:\n" + sources)
        else:  # small models often answer without citing: show what they were given
            print("\nPassages given (the answer cites none):\n" + "\n".join(
                f"[{n}] {hit.citation()}" for n, hit in enumerate(answer.passages, start=1)))
        if answer.unknown_citations:
            print(f"warning: the answer cites {', '.join(f'[{n}]' for n in answer.unknown_citations)}, which name "
                  f"no passage it was given ({len(answer.passages)} passages)", file=sys.stderr)


def cmd_summarize(args: argparse.Namespace) -> None:
    from scratchlm.llm import LLM
    from scratchlm.progress import stage
    from scratchlm.rag.summarize import summarize

    progress = show_progress(args)
    with stage(f"loading {args.model}", progress):
        llm = LLM.load(args.model)
    print(summarize(llm, args.file, args.method, max_new_tokens=args.max_new_tokens, part_tokens=args.part_tokens,
                    progress=progress))


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="an SQLite file (created if missing) or a postgresql://user:password@host/db URL")
    p.add_argument("--embedding-model", default=None,
                   help=f"embedding model (default: the store's own; {DEFAULT_EMBEDDING_MODEL} for a new store)")


def _retrieval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=5, help="passages to return (default 5)")
    p.add_argument("--mode", default="hybrid", choices=["dense", "keyword", "hybrid"],
                   help="dense (meaning), keyword (BM25, exact words) or hybrid (both, scores fused; default)")
    p.add_argument("--where", default=None, metavar="source=GLOB", help="only documents whose path matches GLOB")
    p.add_argument("--rerank", action="store_true",
                   help="rescore the top 20 by how likely the chat model (--model) finds the query after each "
                        "passage: slower; see docs/rag.md")
    p.add_argument("--model", default=DEFAULT_CHAT_MODEL, help=f"chat model (default {DEFAULT_CHAT_MODEL})")


def register(subparsers) -> None:
    rag = subparsers.add_parser("rag", help="retrieval-augmented generation over your documents (ingest, search, "
                                            "ask, summarize)")
    sub = rag.add_subparsers(dest="rag_command", required=True, metavar="RAG_COMMAND")

    p = sub.add_parser("ingest", help="add files and folders to a store (unchanged files are skipped)")
    _store_arg(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (folders are read recursively)")
    p.add_argument("--glob", default=None,
                   help="in folders, only files matching this pattern, e.g. '*.md' (default: .txt .md .html .pdf); "
                        "any UTF-8 text file can be chosen this way")
    p.add_argument("--chunk-tokens", type=int, default=256, help="most embedding-model tokens per chunk (default 256)")
    p.add_argument("--overlap", type=int, default=32, help="tokens shared by consecutive chunks (default 32)")
    p.add_argument("--sync", action="store_true", help="also remove documents under these folders whose files are gone")
    add_progress_flag(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("remove", help="remove the documents of files (or of every file under folders)")
    p.add_argument("store", help="an SQLite file or a postgresql:// URL")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("info", help="a store's embedding model, counts and documents")
    p.add_argument("store", help="an SQLite file or a postgresql:// URL")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("search", help="find the passages that match a query")
    _store_arg(p)
    p.add_argument("query")
    _retrieval_args(p)
    p.add_argument("--dense-weight", type=float, default=1.0, help="hybrid: weight of the dense scores (default 1)")
    p.add_argument("--keyword-weight", type=float, default=1.0,
                   help="hybrid: weight of the keyword scores (default 1)")
    p.add_argument("--fusion", default="zscore", choices=["zscore", "rrf"],
                   help="hybrid: standardised scores mixed by weight (zscore, default) or reciprocal rank fusion")
    p.add_argument("--json", action="store_true", help="print the hits as JSON (source, page, span, score, text)")
    add_progress_flag(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("ask", help="answer a question from the store with a chat model, citing the passages")
    _store_arg(p)
    p.add_argument("question")
    _retrieval_args(p)
    p.add_argument("--min-similarity", type=float, default=0.25,
                   help="below this cosine for every passage, answer that nothing was found (default 0.25)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens in the answer (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    add_progress_flag(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("summarize", help="summarize a document longer than the model's context")
    p.add_argument("file", help="a .txt, .md, .html or .pdf file")
    p.add_argument("--method", default="map-reduce", choices=["map-reduce", "refine"],
                   help="map-reduce (parts summarized apart, then combined; default) or refine (one running summary)")
    p.add_argument("--model", default=DEFAULT_CHAT_MODEL, help=f"chat model (default {DEFAULT_CHAT_MODEL})")
    p.add_argument("--max-new-tokens", type=int, default=200, help="most tokens per summary (default 200)")
    p.add_argument("--part-tokens", type=int, default=None,
                   help="most tokens of text per part (default: what fits the model's context)")
    add_progress_flag(p)
    p.set_defaults(func=cmd_summarize)
