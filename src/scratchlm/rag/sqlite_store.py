"""The embedded store: one SQLite file (stdlib ``sqlite3``) with documents, chunks and vectors; search in memory.

- Keyword search is BM25 over an inverted index held in numpy arrays (``bm25.py``: k1 = 1.2, b = 0.75, the
  IDF floored at 1e-6 as SQLite FTS5 does). FTS5, which earlier versions used, scores every row holding any
  query word through a per-row callback: 40-100 ms of CPU per question at 100,000 chunks against 5-11 ms here,
  with the same top 40 on all 72 benchmark questions. The index is built from the chunks' texts when the store
  has changed (about 12 s of CPU at 100,000 chunks; ``scratchlm rag ingest`` does it at its end) and saved in
  the file (table ``keyword_index``, one ``.npz`` blob tagged with the store's generation), so that the next
  process loads it instead of rebuilding.
- Dense search is exact: the vectors live in the ``chunks`` table as float32 blobs and are loaded once into a
  torch matrix (optionally int8 per row, a quarter of the memory); a query is one matrix-vector product and a
  top-k. At laptop scale (1e5 chunks x 384 dims) that takes a few milliseconds, as fast as an extension like
  sqlite-vec, which is brute force too, and it needs no SQLite extension (many Python builds cannot load one).
- Both are reloaded when another connection has written (a generation counter in ``meta``).
- WAL journal: one writer and many readers at once; a writer waits up to 30 s for another.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from urllib.request import pathname2url

import numpy as np
import torch

from scratchlm.rag.bm25 import BM25Index
from scratchlm.rag.store import SCHEMA_VERSION, ChunkRecord, Store, StoreError, keyword_terms

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL, kind TEXT NOT NULL,
    n_chunks INTEGER NOT NULL, added TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ord INTEGER NOT NULL, text TEXT NOT NULL, page INTEGER, start INTEGER NOT NULL, "end" INTEGER NOT NULL,
    heading TEXT NOT NULL, embedding BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_document ON chunks(document_id);
CREATE TABLE IF NOT EXISTS keyword_index (generation TEXT NOT NULL, data BLOB NOT NULL);
"""


def _connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    # Percent-encode the path: a '#' or '?' in a file name would otherwise end the URI's path part.
    uri = f"file:{pathname2url(str(Path(path).resolve()))}{'?mode=ro' if readonly else ''}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def read_meta(path: str) -> dict[str, str]:
    """The ``meta`` table of an existing store file ({} when there is none)."""
    if not Path(path).is_file():
        return {}
    try:
        conn = _connect(path, readonly=True)
        try:
            return dict(conn.execute("SELECT key, value FROM meta").fetchall())
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path} is not a scratchlm store ({e}); give a new file name or a store made by "
                         f"`scratchlm rag ingest`") from None


class SQLiteStore(Store):
    def __init__(self, path: str | Path, model: str, dim: int, create: bool = True, int8: bool = False):
        self.location = str(path)
        self.model, self.dim, self.int8 = model, dim, int8
        base = Path(path).resolve().as_posix()
        self.own_files = {base + suffix for suffix in ("", "-wal", "-shm", "-journal")}  # never ingested
        if not create and not Path(path).is_file():
            raise StoreError(f"no store at {path}: create one with `scratchlm rag ingest {path} FILES...`")
        try:
            self.conn = _connect(str(path))
            tables = {row[0] for row in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "meta" not in tables:  # someone's own database: never add our tables to it
                self.conn.close()
                raise StoreError(f"{path} is an SQLite database that is not a scratchlm store (it has tables "
                                 f"{', '.join(sorted(tables)[:5])}); give a new file name for the store")
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.executescript(_SCHEMA)
            meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{path} is not a scratchlm store ({e}); give a new file name") from None
        self._check_model(meta, model, dim)
        if not meta.get("model"):
            self._write_meta({"model": model, "dim": str(dim), "schema": SCHEMA_VERSION, "generation": "0"})
        self._matrix: torch.Tensor | None = None  # [N, dim] float32 (or int8 with per-row scales)
        self._scales: torch.Tensor | None = None
        self._ids = self._doc_ids = None
        self._generation = None
        self._index: BM25Index | None = None
        self._index_generation = None

    def _write_meta(self, values: dict[str, str]) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", values.items())
        self.conn.execute("COMMIT")

    # -- documents --------------------------------------------------------------------------------
    def document_hash(self, source: str) -> str | None:
        row = self.conn.execute("SELECT sha256 FROM documents WHERE source = ?", (source,)).fetchone()
        return row[0] if row else None

    def sources(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT source FROM documents ORDER BY source")]

    def count(self) -> tuple[int, int]:
        return (self.conn.execute("SELECT count(*) FROM documents").fetchone()[0],
                self.conn.execute("SELECT count(*) FROM chunks").fetchone()[0])

    def replace_document(self, source: str, sha256: str, kind: str, chunks: Sequence, vectors: torch.Tensor) -> None:
        if vectors.shape != (len(chunks), self.dim):
            raise ValueError(f"{len(chunks)} chunks need vectors of shape ({len(chunks)}, {self.dim}), "
                             f"got {tuple(vectors.shape)}")
        blobs = vectors.detach().to(torch.float32).contiguous().numpy()
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DELETE FROM documents WHERE source = ?", (source,))
            doc_id = conn.execute("INSERT INTO documents(source, sha256, kind, n_chunks) VALUES (?, ?, ?, ?)",
                                  (source, sha256, kind, len(chunks))).lastrowid
            conn.executemany(
                'INSERT INTO chunks(document_id, ord, text, page, start, "end", heading, embedding) '
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(doc_id, i, c.text, c.page, c.start, c.end, c.heading, blobs[i].tobytes())
                 for i, c in enumerate(chunks)])
            self._bump(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def remove_document(self, source: str) -> bool:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            removed = conn.execute("DELETE FROM documents WHERE source = ?", (source,)).rowcount > 0
            self._bump(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return removed

    @staticmethod
    def _bump(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    # -- search -----------------------------------------------------------------------------------
    def _load_vectors(self) -> None:
        """(Re)load the vector matrix when the store changed since it was loaded."""
        generation = self._current_generation()
        if self._matrix is not None and generation == self._generation:
            return
        rows = self.conn.execute("SELECT id, document_id, embedding FROM chunks ORDER BY id").fetchall()
        self._ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        self._doc_ids = torch.tensor([r[1] for r in rows], dtype=torch.long)
        flat = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32)
        matrix = torch.from_numpy(flat.copy()).view(len(rows), self.dim)
        if self.int8:
            # Symmetric per-row int8 (the rows are unit vectors): 4x less memory, cosine error ~1e-3.
            self._scales = matrix.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            matrix = torch.round(matrix / self._scales[:, None]).to(torch.int8)
        self._matrix, self._generation = matrix, generation

    def dense_search(self, query: torch.Tensor, k: int, where: str | None = None) -> list[tuple[int, float]]:
        self._load_vectors()
        if self._matrix.shape[0] == 0:
            return []
        query = query.to(torch.float32).reshape(-1)
        if self.int8:
            scores = (self._matrix.to(torch.float32) @ query) * self._scales
        else:
            scores = self._matrix @ query
        if where is not None:
            allowed = [r[0] for r in self.conn.execute("SELECT id FROM documents WHERE source GLOB ?", (where,))]
            mask = torch.isin(self._doc_ids, torch.tensor(allowed, dtype=torch.long))
            scores = scores.masked_fill(~mask, float("-inf"))
        top = torch.topk(scores, min(k, scores.numel()))
        return [(int(self._ids[i]), float(s)) for s, i in zip(top.values, top.indices) if s != float("-inf")]

    def keyword_search(self, query: str, k: int, where: str | None = None) -> list[tuple[int, float]]:
        terms = keyword_terms(query)
        if not terms:
            return []
        index = self.keyword_index()
        allowed = None
        if where is not None:
            in_scope = [r[0] for r in self.conn.execute(
                "SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id WHERE d.source GLOB ?", (where,))]
            allowed = np.isin(index.ids, np.asarray(in_scope, dtype=np.int64))
        return index.search(terms, k, allowed)

    def _current_generation(self) -> str:
        return self.conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]

    def keyword_index(self) -> BM25Index:
        """The BM25 index of the store as it is now: the one in memory, else the one saved in the file, else
        built from the chunks' texts (and saved, when no other connection is writing)."""
        generation = self._current_generation()
        if self._index is not None and self._index_generation == generation:
            return self._index
        row = self.conn.execute("SELECT data FROM keyword_index WHERE generation = ?", (generation,)).fetchone()
        if row is not None:
            index = BM25Index.from_bytes(row[0])
        else:
            index = BM25Index.build(self.conn.execute("SELECT id, text FROM chunks ORDER BY id"))
            self._save_index(index, generation)
        self._index, self._index_generation = index, generation
        return index

    def warm(self) -> None:
        self.keyword_index()

    def _save_index(self, index: BM25Index, generation: str) -> None:
        """Save ``index`` for the next process; skipped (it is only a cache) when a writer holds the file."""
        self.conn.execute("PRAGMA busy_timeout = 0")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:  # locked by an ingest in another process
            return
        finally:
            self.conn.execute("PRAGMA busy_timeout = 30000")
        try:
            if self._current_generation() == generation:  # nobody wrote since we read the chunks
                self.conn.execute("DELETE FROM keyword_index")
                self.conn.execute("INSERT INTO keyword_index(generation, data) VALUES (?, ?)",
                                  (generation, index.to_bytes()))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def chunks(self, ids: Sequence[int]) -> dict[int, ChunkRecord]:
        ids = list(ids)
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.conn.execute(
            f'SELECT c.id, d.source, c.page, c.start, c."end", c.heading, c.text FROM chunks c '
            f"JOIN documents d ON d.id = c.document_id WHERE c.id IN ({marks})", ids).fetchall()
        return {r[0]: ChunkRecord(*r) for r in rows}

    def close(self) -> None:
        self.conn.close()
