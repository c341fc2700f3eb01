"""The embedded store: one SQLite file (stdlib ``sqlite3``) with documents, chunks, vectors and an FTS5 index.

- Keyword search is FTS5's ``bm25()`` (Robertson/Sparck Jones BM25 with k1 = 1.2, b = 0.75; the IDF of a term
  found in at least half the chunks is floored at 1e-6 instead of going negative). FTS5 scores every row that
  matches any term of an OR query, so a question's common words ("the", "of": every chunk) would make it score
  the whole store while adding at most ~1e-6 per term to any score. Such terms are left out of the MATCH
  (document frequencies from an ``fts5vocab`` table, cached per store generation); when that leaves fewer than
  ``k`` matches, the full query runs, so only rankings decided by those near-zero contributions can differ.
- Dense search is exact: the vectors live in the ``chunks`` table as float32 blobs and are loaded once into a
  torch matrix (optionally int8 per row, a quarter of the memory); a query is one matrix-vector product and a
  top-k. At laptop scale (1e5 chunks x 384 dims) that takes a few milliseconds, as fast as an extension like
  sqlite-vec, which is brute force too, and it needs no SQLite extension (many Python builds cannot load one).
  The matrix is reloaded when another connection has written (a generation counter in ``meta``).
- WAL journal: one writer and many readers at once; a writer waits up to 30 s for another.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from urllib.request import pathname2url

import numpy as np
import torch

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
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(text, content='chunks', content_rowid='id');
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text) VALUES (new.id, new.text); END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.id, old.text); END;
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
        self._df_generation, self._n_rows, self._dfs = None, 0, {}  # keyword document frequencies, cached
        # fts5vocab over the index: (term, doc = chunks holding it). A TEMP table: nothing is added to the file.
        self.conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.chunks_fts_terms "
                          "USING fts5vocab(main, 'chunks_fts', 'row')")

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
        informative = self._informative_terms(terms)
        if informative and len(informative) < len(terms):
            rows = self._bm25(informative, k, where)
            if len(rows) == k:
                return rows
        return self._bm25(terms, k, where)

    def _current_generation(self) -> str:
        return self.conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]

    def _informative_terms(self, terms: list[str]) -> list[str]:
        """``terms`` without those found in at least half the chunks: FTS5 floors their IDF at 1e-6
        (``fts5_aux.c``: ``if (idf <= 0.0) idf = 1e-6``, idf = log((N - n + 0.5) / (n + 0.5)))."""
        generation = self._current_generation()
        if generation != self._df_generation:
            self._dfs, self._df_generation = {}, generation
            self._n_rows = self.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        missing = [t for t in terms if t not in self._dfs]
        if missing:
            marks = ",".join("?" * len(missing))
            self._dfs.update(dict.fromkeys(missing, 0))
            self._dfs.update(self.conn.execute(
                f"SELECT term, doc FROM temp.chunks_fts_terms WHERE term IN ({marks})", missing).fetchall())
        return [t for t in terms if 2 * self._dfs[t] < self._n_rows]

    def _bm25(self, terms: list[str], k: int, where: str | None) -> list[tuple[int, float]]:
        match = " OR ".join(f'"{t}"' for t in terms)
        # bm25() is lower-is-better (negative); we return its negation so that higher is better everywhere.
        if where is None:
            rows = self.conn.execute("SELECT rowid, -bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? "
                                     "ORDER BY bm25(chunks_fts), rowid LIMIT ?", (match, k)).fetchall()
        else:
            rows = self.conn.execute(
                "SELECT f.rowid, -bm25(chunks_fts) FROM chunks_fts f JOIN chunks c ON c.id = f.rowid "
                "JOIN documents d ON d.id = c.document_id WHERE chunks_fts MATCH ? AND d.source GLOB ? "
                "ORDER BY bm25(chunks_fts), f.rowid LIMIT ?", (match, where, k)).fetchall()
        return [(int(i), float(s)) for i, s in rows]

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
