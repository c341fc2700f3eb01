"""Keyword search held in memory: BM25 over an inverted index kept in numpy arrays.

Why not SQLite FTS5's ``bm25()``: it calls its ranking function once for every row that holds any query term,
so a question with one moderately common word ("king", in 20% of a play's chunks) costs tens of milliseconds
at 100,000 chunks, however few rows end in the top k. Here every term's postings are two arrays (the rows
that hold it and how often), and a query adds ``idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))``
for each of its terms into one score array, a handful of vectorised numpy operations, then takes the top k:
a few milliseconds at 100,000 chunks.

The scoring is Robertson/Sparck Jones BM25 as FTS5 and bm25s compute it (k1 = 1.2, b = 0.75, the IDF
``log((N - n + 0.5) / (n + 0.5))``; a word in half the rows or more counts only where nothing else matches, with
FTS5's floor of 1e-6: see ``search``). Tokens are ``tokens()``, the same for chunks and queries.

The index is built from the chunks' texts (about a second per 20,000 chunks on one core) and can be saved
as one ``.npz`` blob (numpy arrays only, read back with ``allow_pickle=False``): the SQLite store keeps the
blob of its latest version beside the chunks, so a new process loads it instead of re-reading every text.
"""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from collections.abc import Iterable

import numpy as np

K1, B = 1.2, 0.75
MIN_IDF = 1e-6  # FTS5's floor (fts5_aux.c) for terms in at least half the rows
_WORD = re.compile(r"[^\W_]+")


def tokens(text: str) -> list[str]:
    """The keyword tokens of ``text`` in order, repeats kept: lower-cased runs of letters and digits (FTS5's
    ``unicode61`` rule, without its folding of diacritics: "café" and "cafe" are different words, as in
    PostgreSQL's ``simple`` configuration that the other store uses)."""
    return _WORD.findall(text.lower())


class BM25Index:
    """An inverted index over rows ``0..N-1`` (each row one chunk, ``ids[row]`` its chunk id).

    ``starts[t]:starts[t + 1]`` is the slice of ``rows`` and ``tfs`` holding term ``t``'s postings."""

    def __init__(self, vocab: list[str], starts: np.ndarray, rows: np.ndarray, tfs: np.ndarray,
                 lengths: np.ndarray, ids: np.ndarray):
        self.vocab = {term: t for t, term in enumerate(vocab)}
        self.starts, self.rows, self.tfs = starts, rows, tfs
        self.lengths, self.ids = lengths, ids
        self.avgdl = float(lengths.mean()) if len(lengths) else 0.0
        # the per-row half of BM25's denominator, computed once: k1 * (1 - b + b * dl / avgdl)
        self._norm = (K1 * (1 - B + B * lengths / max(self.avgdl, 1e-9))).astype(np.float32)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, chunks: Iterable[tuple[int, str]]) -> BM25Index:
        """Index ``(chunk id, text)`` pairs."""
        vocab: dict[str, int] = {}
        term_ids: list[int] = []
        counts: list[int] = []
        per_row: list[int] = []
        lengths: list[int] = []
        ids: list[int] = []
        for chunk_id, text in chunks:
            words = tokens(text)
            bag = Counter(words)
            term_ids.extend(vocab.setdefault(w, len(vocab)) for w in bag)
            counts.extend(bag.values())
            per_row.append(len(bag))
            lengths.append(len(words))
            ids.append(chunk_id)
        term_arr = np.asarray(term_ids, dtype=np.int32)
        row_arr = np.repeat(np.arange(len(ids), dtype=np.int32), per_row)
        order = np.argsort(term_arr, kind="stable")  # postings grouped by term, rows ascending within a term
        starts = np.zeros(len(vocab) + 1, dtype=np.int64)
        np.cumsum(np.bincount(term_arr, minlength=len(vocab)), out=starts[1:])
        return cls(list(vocab), starts, row_arr[order], np.asarray(counts, dtype=np.float32)[order],
                   np.asarray(lengths, dtype=np.float32), np.asarray(ids, dtype=np.int64))

    def search(self, terms: list[str], k: int, allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """The ``k`` best ``(chunk id, score)`` for ``terms`` (distinct), best first; rows where ``allowed`` (a
        boolean array over rows) is False are left out. Only rows holding at least one term are returned.

        Score: the BM25 of the informative terms (those in fewer than half the rows), as bm25s computes it (it
        gives the common terms an IDF of 0); a row that holds only common terms scores their BM25 with FTS5's
        IDF floor of 1e-6 instead, so that it still ranks below every informative match and a store where every
        chunk holds the query word still ranks by term frequency. Ties by chunk id.
        """
        n = len(self.ids)
        found = [self.vocab[t] for t in terms if t in self.vocab]
        if not found or k <= 0:
            return []
        informative = np.zeros(n, dtype=np.float64)
        common = np.zeros(n, dtype=np.float64)
        hit = np.zeros(n, dtype=bool)
        for t in found:
            s, e = self.starts[t], self.starts[t + 1]
            rows, tf = self.rows[s:e], self.tfs[s:e]
            idf = math.log((n - (e - s) + 0.5) / ((e - s) + 0.5))
            target = informative if idf > 0 else common
            target[rows] += max(idf, MIN_IDF) * tf * (K1 + 1) / (tf + self._norm[rows])  # one posting per row
            hit[rows] = True
        if allowed is not None:
            hit &= allowed
        candidates = np.flatnonzero(hit)
        score = np.where(informative[candidates] > 0, informative[candidates], common[candidates])
        if len(candidates) > k:  # partial sort: only the k best are ordered (ties at the cut kept for the id order)
            keep = score >= score[np.argpartition(-score, k - 1)[k - 1]]
            candidates, score = candidates[keep], score[keep]
        order = np.lexsort((self.ids[candidates], -score))[:k]
        return [(int(self.ids[candidates[i]]), float(score[i])) for i in order]

    # -- saving -----------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The index as one ``.npz`` blob (uncompressed: it loads at disk speed)."""
        buffer = io.BytesIO()
        vocab = "\n".join(self.vocab).encode("utf-8")  # tokens never hold a newline
        np.savez(buffer, vocab=np.frombuffer(vocab, dtype=np.uint8), starts=self.starts, rows=self.rows,
                 tfs=self.tfs, lengths=self.lengths, ids=self.ids)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> BM25Index:
        with np.load(io.BytesIO(blob), allow_pickle=False) as f:
            text = f["vocab"].tobytes().decode("utf-8")
            vocab = text.split("\n") if text else []
            return cls(vocab, f["starts"], f["rows"], f["tfs"], f["lengths"], f["ids"])
