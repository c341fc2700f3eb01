"""The store: documents, their chunks, the chunks' vectors and a keyword index, behind one small interface.

Two engines implement it with the same schema and behaviour:

- ``SQLiteStore`` (``sqlite_store.py``): one file, stdlib ``sqlite3``, BM25 and exact vector search in memory;
- ``PostgresStore`` (``postgres_store.py``): PostgreSQL with pgvector (HNSW) and ``tsvector`` full-text search.

``open_store(location, embedder)`` picks the engine from the location: a ``postgresql://`` URL or a file path.

Schema (both engines)::

    meta(key, value)                          embedding model name and dimension, schema version
    documents(id, source, sha256, kind, n_chunks, added)
    chunks(id, document_id, ord, text, page, start, end, heading, embedding)  + a keyword index on text

A store records the embedding model that made its vectors; opening it with another model is refused, because
vectors of two models are not comparable. Every write of one document is one transaction: a file is either
fully in the store (document row, all chunks, all vectors) or not at all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from scratchlm.errors import ScratchLMError
from scratchlm.rag.bm25 import tokens

SCHEMA_VERSION = "1"


class StoreError(ScratchLMError):
    """A store that cannot be opened or used: unreachable server, other embedding model, damaged file."""


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class Embedder(Protocol):
    """What the RAG code needs from an embedding model (``scratchlm.encoder.Encoder`` provides it)."""

    name: str
    dim: int
    max_tokens: int
    tokenizer: Tokenizer

    def embed(self, texts: list[str]) -> torch.Tensor:
        """[N, dim] float32, each row L2-normalised."""
        ...


@dataclass(frozen=True)
class ChunkRecord:
    """A chunk as stored, with where it came from."""

    id: int
    source: str
    page: int | None
    start: int
    end: int
    heading: str
    text: str


def glob_to_regex(pattern: str) -> str:
    """A shell glob (``*``, ``?``, ``[...]``; ``*`` also matches ``/``, as SQLite's GLOB) as an anchored regex
    that both Python and PostgreSQL read the same way."""
    out, i = ["^"], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[" and "]" in pattern[i + 1:]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1:j]
            negate = body.startswith(("!", "^"))
            body = re.sub(r"([\\\]])", r"\\\1", body[1:] if negate else body)
            out.append(f"[{'^' if negate else ''}{body}]")
            i = j
        else:
            out.append(re.escape(c) if not c.isalnum() else c)
        i += 1
    return "".join(out) + "$"


def keyword_terms(text: str) -> list[str]:
    """Query terms for the keyword index: the distinct ``bm25.tokens`` of ``text``, in order (a repeated word
    counts once, as in bm25s). Both stores and the benchmark's bm25s reference use these tokens."""
    return list(dict.fromkeys(tokens(text)))


class Store:
    """The interface both engines implement. Every method is one transaction or one read."""

    location: str  # what to show a user (a path, or a URL without its password)
    model: str
    dim: int
    own_files: set[str] = set()  # the store's own files (SQLite), which ingesting a folder must skip

    # -- documents --------------------------------------------------------------------------------
    def document_hash(self, source: str) -> str | None:
        """The sha256 stored for ``source``, or None when it is not in the store."""
        raise NotImplementedError

    def sources(self) -> list[str]:
        """Every document's source path, sorted."""
        raise NotImplementedError

    def replace_document(self, source: str, sha256: str, kind: str, chunks: Sequence, vectors: torch.Tensor) -> None:
        """Put ``source`` with its ``chunks`` (``chunking.Chunk``) and their ``vectors`` [N, dim] in the store,
        replacing any earlier version of it, atomically."""
        raise NotImplementedError

    def remove_document(self, source: str) -> bool:
        """Remove ``source`` and its chunks; False when it was not there."""
        raise NotImplementedError

    def count(self) -> tuple[int, int]:
        """(documents, chunks)."""
        raise NotImplementedError

    # -- search -----------------------------------------------------------------------------------
    def dense_search(self, query: torch.Tensor, k: int, where: str | None = None) -> list[tuple[int, float]]:
        """(chunk id, cosine similarity) of the ``k`` chunks nearest to ``query`` [dim], best first;
        ``where`` is a glob on the source path."""
        raise NotImplementedError

    def warm(self) -> None:
        """Build now what the first search would otherwise build (``ingest`` calls it at its end)."""

    def keyword_search(self, query: str, k: int, where: str | None = None) -> list[tuple[int, float]]:
        """(chunk id, keyword score, higher is better) of the ``k`` best keyword matches of ``query``."""
        raise NotImplementedError

    def chunks(self, ids: Sequence[int]) -> dict[int, ChunkRecord]:
        """The chunks with these ids."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- shared checks ----------------------------------------------------------------------------
    def _check_model(self, stored: dict[str, str], model: str, dim: int) -> None:
        """Refuse a store made with another embedding model (its vectors would be meaningless to ours)."""
        if stored.get("model") and (stored["model"] != model or int(stored["dim"]) != dim):
            raise StoreError(f"{self.location} was made with the embedding model {stored['model']} "
                             f"(dimension {stored['dim']}), not {model} (dimension {dim}); use that model, "
                             f"or ingest into a new store")


def redact_url(url: str) -> str:
    """A database URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def open_store(location: str, embedder: Embedder | None = None, *, model: str | None = None,
               dim: int | None = None, create: bool = True) -> Store:
    """Open (or create) the store at ``location``: a ``postgresql://`` URL or an SQLite file path.

    The embedding model is ``embedder`` (or ``model`` and ``dim``); a store made with another is refused."""
    if embedder is not None:
        model, dim = embedder.name, embedder.dim
    if model is None or dim is None:
        raise ValueError("open_store needs an embedder (or model and dim)")
    if str(location).startswith(("postgresql://", "postgres://")):
        from scratchlm.rag.postgres_store import PostgresStore

        return PostgresStore(str(location), model, dim, create=create)
    from scratchlm.rag.sqlite_store import SQLiteStore

    return SQLiteStore(location, model, dim, create=create)


def stored_model(location: str) -> tuple[str, int] | None:
    """(model, dim) recorded in an existing store, or None for a new or empty one: commands open a store
    with the model that made it."""
    if str(location).startswith(("postgresql://", "postgres://")):
        from scratchlm.rag.postgres_store import read_meta
    else:
        from scratchlm.rag.sqlite_store import read_meta
    meta = read_meta(str(location))
    return (meta["model"], int(meta["dim"])) if meta.get("model") else None
