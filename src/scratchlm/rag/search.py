"""Retrieval: dense (cosine), keyword (BM25) and hybrid (reciprocal rank fusion), with optional reranking.

    hits = search(store, encoder, "who killed Polonius?", k=5)                  # hybrid
    hits = search(store, encoder, "ERR_4021", mode="keyword", where="*.md")

Hybrid search asks both indexes for ``candidates`` hits and fuses their ranks with reciprocal rank fusion
(Cormack, Clarke & Buettcher 2009): ``score(d) = sum_m w_m / (rrf_k + rank_m(d))`` with ranks from 1 and
``rrf_k = 60`` as in the paper. Ranks, not scores, are fused, because a cosine and a BM25 score live on
different scales. ``weights=(dense, keyword)`` shifts the balance.

Reranking (``rerank=llm``) rescores the fused top candidates with the chat model: the probability that it
answers "yes" to "does this passage answer the question?" (the pointwise relevance prompt of Nogueira et al.
2020, "Document Ranking with a Pretrained Sequence-to-Sequence Model", with a chat model in place of T5).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scratchlm.rag.store import Embedder, Store

MODES = ("dense", "keyword", "hybrid")
RRF_K = 60


@dataclass
class Hit:
    """One retrieved chunk, with where it came from and how it scored."""

    chunk_id: int
    source: str
    page: int | None
    start: int
    end: int
    heading: str
    text: str
    score: float  # the ranking score of the mode: cosine, BM25, fused RRF, or rerank probability
    dense_score: float | None = None  # cosine similarity, when the dense index returned it
    keyword_score: float | None = None  # BM25, when the keyword index returned it

    def citation(self, cwd: str | None = None) -> str:
        """``docs/guide.pdf p. 7`` (paths under ``cwd`` shown relative to it)."""
        import os

        source = self.source
        base = (cwd or os.getcwd()).rstrip("/") + "/"
        if source.startswith(base):
            source = source[len(base):]
        return f"{source} p. {self.page}" if self.page is not None else source

    def to_json(self) -> dict:
        return {"source": self.source, "page": self.page, "span": [self.start, self.end], "heading": self.heading,
                "score": self.score, "text": self.text}


def fit_query(embedder: Embedder, query: str, warn: Callable[[str], None] | None = None) -> str:
    """``query`` cut (at a word) to the embedding model's input, with a notice when it was too long."""
    limit = embedder.max_tokens - 2  # [CLS] and [SEP]
    n = len(embedder.tokenizer.encode(query))
    if n <= limit:
        return query
    words = re.findall(r"\S+\s*", query)
    lo, hi = 0, len(words)
    while lo < hi:  # the longest prefix of words that fits
        mid = (lo + hi + 1) // 2
        if len(embedder.tokenizer.encode("".join(words[:mid]))) <= limit:
            lo = mid
        else:
            hi = mid - 1
    (warn or (lambda m: warnings.warn(m, stacklevel=3)))(
        f"the query has {n} tokens, more than {embedder.name}'s input of {limit}: the dense search uses its "
        f"first {lo} words (the keyword search uses all of it)")
    return "".join(words[:lo])


def reciprocal_rank_fusion(rankings: list[list[int]], weights: list[float], rrf_k: int = RRF_K) -> dict[int, float]:
    """Fused scores of the ids in several best-first ``rankings``."""
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights):
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + weight / (rrf_k + rank)
    return scores


def search(store: Store, embedder: Embedder, query: str, k: int = 5, mode: str = "hybrid",
           where: str | None = None, weights: tuple[float, float] = (1.0, 1.0), rrf_k: int = RRF_K,
           candidates: int | None = None, rerank=None, rerank_top: int = 20,
           warn: Callable[[str], None] | None = None) -> list[Hit]:
    """The ``k`` best chunks for ``query``: ``mode`` dense, keyword or hybrid; ``where`` a glob on the source
    path; ``weights`` (dense, keyword) for hybrid; ``rerank`` an ``LLM`` that rescores the top ``rerank_top``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if k < 1:
        raise ValueError("k must be at least 1")
    pool = max(k, rerank_top if rerank is not None else 0)
    candidates = candidates or max(4 * pool, 40)
    dense, keyword = [], []
    if mode in ("dense", "hybrid"):
        vector = embedder.embed([fit_query(embedder, query, warn)])[0]
        dense = store.dense_search(vector, candidates if mode == "hybrid" else pool, where)
    if mode in ("keyword", "hybrid"):
        keyword = store.keyword_search(query, candidates if mode == "hybrid" else pool, where)
    dense_scores, keyword_scores = dict(dense), dict(keyword)
    if mode == "dense":
        ranked = dense
    elif mode == "keyword":
        ranked = keyword
    else:
        fused = reciprocal_rank_fusion([[i for i, _ in dense], [i for i, _ in keyword]], list(weights), rrf_k)
        ranked = sorted(fused.items(), key=lambda item: (-item[1], item[0]))
    ranked = ranked[:pool]
    records = store.chunks([i for i, _ in ranked])
    hits = [Hit(i, r.source, r.page, r.start, r.end, r.heading, r.text, s, dense_scores.get(i),
                keyword_scores.get(i)) for i, s in ranked if (r := records.get(i)) is not None]
    if rerank is not None and hits:
        hits = rerank_hits(rerank, query, hits)
    return hits[:k]


RERANK_PROMPT = ("Passage:\n{passage}\n\nQuestion: {question}\n\n"
                 "Does the passage answer the question? Answer yes or no.")


@torch.no_grad()
def relevance(llm, question: str, passage: str, max_passage_tokens: int = 384) -> float:
    """P("yes") / (P("yes") + P("no")) for the chat model's first answer token to the relevance prompt."""
    tok = llm.tokenizer
    ids = tok.encode(passage)
    if len(ids) > max_passage_tokens:
        passage = tok.decode(ids[:max_passage_tokens])
    prompt = llm.encode_chat([{"role": "user", "content": RERANK_PROMPT.format(passage=passage, question=question)}])
    logits = llm.model(torch.tensor([prompt]))[0, -1].float()
    yes = [t for w in ("yes", "Yes", " yes", " Yes") if len(t := tok.encode(w)) == 1]
    no = [t for w in ("no", "No", " no", " No") if len(t := tok.encode(w)) == 1]
    probs = torch.softmax(logits, dim=-1)
    p_yes = float(sum(probs[t[0]] for t in yes))
    p_no = float(sum(probs[t[0]] for t in no))
    return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.0


def rerank_hits(llm, question: str, hits: list[Hit]) -> list[Hit]:
    """``hits`` reordered by the chat model's relevance probability (ties keep the retrieval order)."""
    scored = [(relevance(llm, question, h.text), -n, h) for n, h in enumerate(hits)]
    scored.sort(key=lambda s: (s[0], s[1]), reverse=True)
    out = []
    for p, _, h in scored:
        h.score = p
        out.append(h)
    return out
