"""Ingest: files and folders into a store, idempotently.

For each file: hash its bytes; an unchanged file (same sha256 as stored) is skipped without reading it further;
a new or changed one is read, chunked, embedded and written in one transaction that replaces its old chunks, so
a failure (or Ctrl-C) part-way leaves every file fully in or fully out. ``sync=True`` also removes the documents
under the given folders whose files have gone. Files that cannot be read (encrypted PDF, binary) are reported and
skipped; the others go on.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from scratchlm.progress import bar
from scratchlm.rag.chunking import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP, chunk_document
from scratchlm.rag.documents import TEXT_SUFFIXES, DocumentError, content_hash, read_document
from scratchlm.rag.store import Embedder, Store

EMBED_BATCH = 64


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    chunks: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        rate = f" ({self.chunks / self.seconds:.1f} chunks/s)" if self.seconds > 0 and self.chunks else ""
        return (f"{len(self.added)} added, {len(self.updated)} updated, {len(self.unchanged)} unchanged, "
                f"{len(self.removed)} removed, {len(self.skipped)} skipped; {self.chunks} chunks embedded in "
                f"{self.seconds:.1f} s{rate}")


def find_files(paths: Iterable[str | Path], glob: str | None = None) -> list[Path]:
    """The files named, and in each folder named the files matching ``glob`` (default: the known document
    suffixes), recursively, sorted; hidden files and folders are left out."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if not f.is_file() or any(part.startswith(".") for part in rel.parts):
                    continue
                if glob is not None and not (fnmatch.fnmatch(rel.as_posix(), glob) or fnmatch.fnmatch(f.name, glob)):
                    continue
                if glob is None and f.suffix.lower() not in TEXT_SUFFIXES:
                    continue
                out.append(f)
        elif p.is_file():
            out.append(p)
        else:
            raise DocumentError(f"{p}: no such file or folder")
    return sorted(set(out))


def token_counter(embedder: Embedder) -> Callable[[str], int]:
    """Number of the embedding model's tokens in a text, its special tokens ([CLS], [SEP]) not counted."""
    specials = len(embedder.tokenizer.encode(""))  # 2 for a BERT WordPiece tokenizer, which adds them
    return lambda text: len(embedder.tokenizer.encode(text)) - specials


def embed_batches(embedder: Embedder, texts: list[str], progress=None):
    """Embeddings of ``texts`` in batches; ``progress`` (a tqdm bar) advances by chunks."""
    import torch

    parts = []
    for i in range(0, len(texts), EMBED_BATCH):
        batch = texts[i:i + EMBED_BATCH]
        parts.append(embedder.embed(batch))
        if progress is not None:
            progress.update(len(batch))
    return torch.cat(parts) if parts else torch.empty(0, embedder.dim)


def ingest(store: Store, embedder: Embedder, paths: Iterable[str | Path], glob: str | None = None,
           chunk_tokens: int = DEFAULT_CHUNK_TOKENS, overlap: int = DEFAULT_OVERLAP, sync: bool = False,
           progress: bool = False, warn: Callable[[str], None] | None = None) -> IngestReport:
    """Add the files under ``paths`` to ``store``: new and changed files are (re)chunked and embedded, unchanged
    ones skipped; with ``sync``, documents under the given folders whose files are gone are removed."""
    paths = list(paths)
    report = IngestReport()
    start = time.perf_counter()
    # The model's window includes its special tokens ([CLS] and [SEP]): a chunk must leave room for them.
    budget = min(chunk_tokens, embedder.max_tokens - len(embedder.tokenizer.encode("")))
    if chunk_tokens > embedder.max_tokens and warn:
        warn(f"--chunk-tokens {chunk_tokens} is over {embedder.name}'s input of {embedder.max_tokens} tokens: "
             f"using {budget}")
    count = token_counter(embedder)
    files = [f for f in find_files(paths, glob) if f.resolve().as_posix() not in store.own_files]

    # First pass: hash, skip the unchanged, read and chunk the rest (cheap next to embedding).
    todo = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            report.skipped.append((str(f), e.strerror or str(e)))
            continue
        source, sha = f.resolve().as_posix(), content_hash(data)
        old = store.document_hash(source)
        if old == sha:
            report.unchanged.append(source)
            continue
        try:
            doc = read_document(f, data)
        except DocumentError as e:
            report.skipped.append((str(f), str(e)))
            continue
        if doc.is_empty:
            report.skipped.append((str(f), f"{f}: empty (no text to index)"))
            continue
        chunks = chunk_document(doc, count, budget, min(overlap, budget // 2 - 1))
        todo.append((source, sha, doc.kind, chunks, old is not None))

    # Second pass: embed and write one file at a time, each in its own transaction.
    total = sum(len(t[3]) for t in todo)
    tracker = bar(None, "embedding", progress, total=total, unit="chunk") if progress and total else None
    try:
        for source, sha, kind, chunks, existed in todo:
            vectors = embed_batches(embedder, [c.text for c in chunks], tracker)
            store.replace_document(source, sha, kind, chunks, vectors)
            (report.updated if existed else report.added).append(source)
            report.chunks += len(chunks)
    finally:
        if tracker is not None:
            tracker.close()

    if sync:
        present = {f.resolve().as_posix() for f in files}
        roots = [Path(p).resolve().as_posix().rstrip("/") + "/" for p in paths if Path(p).is_dir()]
        for source in store.sources():
            if source not in present and any(source.startswith(r) for r in roots):
                store.remove_document(source)
                report.removed.append(source)
    if report.added or report.updated or report.removed:
        store.warm()
    report.seconds = time.perf_counter() - start
    return report


def remove(store: Store, paths: Iterable[str | Path]) -> list[str]:
    """Remove the documents of these files, or of every file under these folders; returns their sources."""
    removed = []
    known = store.sources()
    for p in paths:
        target = Path(p).resolve().as_posix()
        for source in known:
            if source == target or source.startswith(target.rstrip("/") + "/"):
                if store.remove_document(source):
                    removed.append(source)
    return removed
