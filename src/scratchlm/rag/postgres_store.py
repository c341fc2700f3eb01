"""The server store: PostgreSQL with pgvector, for more data or more users than one SQLite file serves.

Same tables and behaviour as ``sqlite_store`` (see ``store.py``), with:

- vectors in a ``vector(dim)`` column under an HNSW index (``vector_cosine_ops``; Malkov & Yashunin 2016):
  approximate nearest neighbours in logarithmic time, with ``hnsw.iterative_scan`` so that a ``--where``
  filter still returns ``k`` hits (pgvector >= 0.8);
- keyword search from a ``tsvector`` column (the ``simple`` configuration: lower-cased words, no stemming, no stop
  words), scored with the same BM25 as the SQLite store (k1 = 1.2, b = 0.75, IDF floored at 1e-6): PostgreSQL's
  own ``ts_rank`` has no IDF. When a document is written, its chunks' ``tsvector`` are unnested once into
  ``keyword_postings``, an inverted index as a table: one row per (term, document) holding the arrays of chunk
  ids, term frequencies and chunk lengths, so that a query reads only its own terms' postings. Scoring the
  candidates by unnesting their whole ``tsvector`` at query time (the first version) cost about ten times more
  (0.56 against 0.05 s per question at 10,000 chunks, 2.2 s at 100,000: benchmarks/rag.py); one row per (term,
  chunk) instead of per (term, document) took 2.7x the chunks table's size on disk.

Connect with a URL, ``postgresql://user:password@host:5432/dbname``; the ``vector`` extension must be available
(``CREATE EXTENSION vector`` is run when missing, which needs the right to create extensions).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from scratchlm.rag.store import (
    SCHEMA_VERSION,
    ChunkRecord,
    Store,
    StoreError,
    glob_to_regex,
    keyword_terms,
    redact_url,
)

K1, B = 1.2, 0.75


def _schema(dim: int) -> list[str]:
    return [
        "CREATE EXTENSION IF NOT EXISTS vector",
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE IF NOT EXISTS documents (
            id BIGSERIAL PRIMARY KEY, source TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL, kind TEXT NOT NULL,
            n_chunks INTEGER NOT NULL, n_tokens BIGINT NOT NULL, added TIMESTAMPTZ NOT NULL DEFAULT now())""",
        f"""CREATE TABLE IF NOT EXISTS chunks (
            id BIGSERIAL PRIMARY KEY, document_id BIGINT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
            ord INTEGER NOT NULL, text TEXT NOT NULL, page INTEGER, start INTEGER NOT NULL, "end" INTEGER NOT NULL,
            heading TEXT NOT NULL, n_tokens INTEGER NOT NULL, embedding vector({dim}) NOT NULL,
            tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', text)) STORED)""",
        "CREATE INDEX IF NOT EXISTS chunks_document ON chunks(document_id)",
        "CREATE INDEX IF NOT EXISTS chunks_embedding ON chunks USING hnsw (embedding vector_cosine_ops)",
        "CREATE INDEX IF NOT EXISTS chunks_tsv ON chunks USING gin (tsv)",
        # The keyword side's inverted index (see the module docstring): per term and document, the chunks holding
        # the term, its frequency in each and each chunk's length (BM25's dl), in chunk-id order.
        """CREATE TABLE IF NOT EXISTS keyword_postings (
            term TEXT NOT NULL, document_id BIGINT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
            chunk_ids BIGINT[] NOT NULL, tfs INTEGER[] NOT NULL, dls INTEGER[] NOT NULL,
            PRIMARY KEY (term, document_id))""",
        "CREATE INDEX IF NOT EXISTS keyword_postings_document ON keyword_postings(document_id)",
    ]


def _index_terms(where: str = "") -> str:
    """SQL that fills ``keyword_postings`` from the ``tsvector`` of the chunks selected by ``where``."""
    return ("INSERT INTO keyword_postings (term, document_id, chunk_ids, tfs, dls) "
            "SELECT u.lexeme, c.document_id, array_agg(c.id ORDER BY c.id), "
            "array_agg(cardinality(u.positions) ORDER BY c.id), array_agg(c.n_tokens ORDER BY c.id) "
            f"FROM chunks c CROSS JOIN LATERAL unnest(c.tsv) u {where} GROUP BY u.lexeme, c.document_id")


def _connect(url: str):
    try:
        import psycopg
    except ImportError:
        raise StoreError("a postgresql:// store needs psycopg: pip install 'scratchlm[rag]'") from None
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.Error as e:
        reason = redact_url(str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        raise StoreError(f"cannot reach PostgreSQL at {redact_url(url)}: {reason}") from None


def read_meta(url: str) -> dict[str, str]:
    """The ``meta`` table of the database at ``url`` ({} when it has none yet)."""
    with _connect(url) as conn:
        exists = conn.execute("SELECT to_regclass('meta')").fetchone()[0]
        return dict(conn.execute("SELECT key, value FROM meta").fetchall()) if exists else {}


def _vector_text(row) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in row) + "]"


def _token_count(text: str) -> int:
    return len(re.findall(r"[^\W_]+", text))


class PostgresStore(Store):
    def __init__(self, url: str, model: str, dim: int, create: bool = True):
        self.url, self.location = url, redact_url(url)
        self.model, self.dim = model, dim
        self.conn = _connect(url)
        import psycopg

        try:
            if not create and self.conn.execute("SELECT to_regclass('meta')").fetchone()[0] is None:
                raise StoreError(f"no store at {self.location}: create one with `scratchlm rag ingest URL FILES...`")
            with self.conn.transaction():
                # One schema creation at a time (two ingests starting together would race on CREATE ... IF NOT EXISTS).
                self.conn.execute("SELECT pg_advisory_xact_lock(7242001)")
                had_terms = self.conn.execute("SELECT to_regclass('keyword_postings')").fetchone()[0] is not None
                for statement in _schema(dim):
                    self.conn.execute(statement)
                if not had_terms:  # a store written before keyword_postings existed: index its chunks once
                    self.conn.execute(_index_terms())
                meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
                self._check_model(meta, model, dim)
                if not meta.get("model"):
                    self.conn.execute("INSERT INTO meta(key, value) VALUES ('model', %s), ('dim', %s), "
                                      "('schema', %s)", (model, str(dim), SCHEMA_VERSION))
        except psycopg.Error as e:
            self.conn.close()
            raise StoreError(f"PostgreSQL at {self.location}: {str(e).strip().splitlines()[0]} (the pgvector "
                             f"extension must be installed; `CREATE EXTENSION vector` needs the right to create it)") \
                from None

    # -- documents --------------------------------------------------------------------------------
    def document_hash(self, source: str) -> str | None:
        row = self.conn.execute("SELECT sha256 FROM documents WHERE source = %s", (source,)).fetchone()
        return row[0] if row else None

    def sources(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT source FROM documents ORDER BY source")]

    def count(self) -> tuple[int, int]:
        row = self.conn.execute("SELECT count(*), coalesce(sum(n_chunks), 0) FROM documents").fetchone()
        return int(row[0]), int(row[1])

    def replace_document(self, source: str, sha256: str, kind: str, chunks: Sequence, vectors: torch.Tensor) -> None:
        if vectors.shape != (len(chunks), self.dim):
            raise ValueError(f"{len(chunks)} chunks need vectors of shape ({len(chunks)}, {self.dim}), "
                             f"got {tuple(vectors.shape)}")
        rows = vectors.detach().to(torch.float32).tolist()
        counts = [_token_count(c.text) for c in chunks]
        with self.conn.transaction():
            self.conn.execute("DELETE FROM documents WHERE source = %s", (source,))
            doc_id = self.conn.execute(
                "INSERT INTO documents(source, sha256, kind, n_chunks, n_tokens) VALUES (%s, %s, %s, %s, %s) "
                "RETURNING id", (source, sha256, kind, len(chunks), sum(counts))).fetchone()[0]
            with self.conn.cursor() as cur, cur.copy(
                    'COPY chunks (document_id, ord, text, page, start, "end", heading, n_tokens, embedding) '
                    "FROM STDIN") as copy:
                for i, c in enumerate(chunks):
                    copy.write_row((doc_id, i, c.text, c.page, c.start, c.end, c.heading, counts[i],
                                    _vector_text(rows[i])))
            self.conn.execute(_index_terms("WHERE c.document_id = %s"), (doc_id,))

    def remove_document(self, source: str) -> bool:
        with self.conn.transaction():
            return self.conn.execute("DELETE FROM documents WHERE source = %s", (source,)).rowcount > 0

    # -- search -----------------------------------------------------------------------------------
    def dense_search(self, query: torch.Tensor, k: int, where: str | None = None) -> list[tuple[int, float]]:
        vector = _vector_text(query.to(torch.float32).reshape(-1).tolist())
        with self.conn.transaction():
            # ef_search bounds the candidate list; it must be at least k to return k hits.
            self.conn.execute(f"SET LOCAL hnsw.ef_search = {max(40, int(k))}")
            if where is None:
                rows = self.conn.execute("SELECT id, 1 - (embedding <=> %s::vector) FROM chunks "
                                         "ORDER BY embedding <=> %s::vector LIMIT %s", (vector, vector, k)).fetchall()
            else:
                self.conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                rows = self.conn.execute(
                    "SELECT c.id, 1 - (c.embedding <=> %s::vector) FROM chunks c JOIN documents d "
                    "ON d.id = c.document_id WHERE d.source ~ %s ORDER BY c.embedding <=> %s::vector LIMIT %s",
                    (vector, glob_to_regex(where), vector, k)).fetchall()
        return sorted(((int(i), float(s)) for i, s in rows), key=lambda r: -r[1])

    def keyword_search(self, query: str, k: int, where: str | None = None) -> list[tuple[int, float]]:
        terms = keyword_terms(query)
        if not terms:
            return []
        # One round trip: the corpus statistics, each query term as the lexemes the 'simple' configuration makes of
        # it (as the chunks' tsvectors were made), and each lexeme's document frequency from its postings.
        rows = self.conn.execute(
            """WITH lex AS (SELECT DISTINCT ON (v.lexeme) v.lexeme, u.ord
                            FROM unnest(%s::text[]) WITH ORDINALITY AS u(term, ord),
                                 unnest(to_tsvector('simple', u.term)) v
                            ORDER BY v.lexeme, u.ord)
               SELECT s.n, s.tokens, lex.lexeme, (SELECT coalesce(sum(cardinality(k.chunk_ids)), 0)
                                                 FROM keyword_postings k WHERE k.term = lex.lexeme)
               FROM (SELECT coalesce(sum(n_chunks), 0) AS n, coalesce(sum(n_tokens), 0) AS tokens
                     FROM documents) s CROSS JOIN lex ORDER BY lex.ord, lex.lexeme""", (terms,)).fetchall()
        if not rows or not int(rows[0][0]):
            return []
        n_chunks = int(rows[0][0])
        avgdl = float(rows[0][1]) / n_chunks
        rows = [(term, int(df)) for _, _, term, df in rows if int(df)]
        if not rows:
            return []
        idfs = [max(math.log((n_chunks - df + 0.5) / (df + 0.5)), 1e-6) for _, df in rows]
        # As in the SQLite store: a term in at least half the chunks (IDF floored at 1e-6) adds at most ~1e-6 to a
        # score; leave it out of the query when the other terms fill k (every chunk would be a candidate).
        informative = [n for n, (_, df) in enumerate(rows) if 2 * df < n_chunks]
        if informative and len(informative) < len(rows):
            hits = self._bm25([rows[n][0] for n in informative], [idfs[n] for n in informative], avgdl, k, where)
            if len(hits) == k:
                return hits
        return self._bm25([term for term, _ in rows], idfs, avgdl, k, where)

    def _bm25(self, terms: list[str], idfs: list[float], avgdl: float, k: int,
              where: str | None) -> list[tuple[int, float]]:
        """The ``k`` best chunks holding any of ``terms``, by BM25 over those terms, from their postings."""
        filter_sql, params = "", []
        if where is not None:
            filter_sql = "WHERE k.document_id IN (SELECT id FROM documents WHERE source ~ %s)"
            params = [glob_to_regex(where)]
        rows = self.conn.execute(
            f"""SELECT p.chunk_id, sum(q.idf * p.tf * {K1 + 1} / (p.tf + {K1} * (1 - {B} + {B} * p.dl / %s)))
                FROM keyword_postings k
                JOIN (SELECT unnest(%s::text[]) AS term, unnest(%s::float8[]) AS idf) q ON q.term = k.term
                CROSS JOIN LATERAL unnest(k.chunk_ids, k.tfs, k.dls) AS p(chunk_id, tf, dl)
                {filter_sql}
                GROUP BY p.chunk_id ORDER BY 2 DESC, p.chunk_id LIMIT %s""",
            [avgdl, terms, idfs, *params, k]).fetchall()
        return [(int(i), float(s)) for i, s in rows]

    def chunks(self, ids: Sequence[int]) -> dict[int, ChunkRecord]:
        ids = list(ids)
        if not ids:
            return {}
        rows = self.conn.execute(
            'SELECT c.id, d.source, c.page, c.start, c."end", c.heading, c.text FROM chunks c '
            "JOIN documents d ON d.id = c.document_id WHERE c.id = ANY(%s)", (ids,)).fetchall()
        return {r[0]: ChunkRecord(*r) for r in rows}

    def close(self) -> None:
        self.conn.close()
