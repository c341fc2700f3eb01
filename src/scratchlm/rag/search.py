"""Retrieval: dense (cosine), keyword (BM25) and hybrid (fused), with optional reranking.

    hits = search(store, encoder, "who killed Polonius?", k=5)                  # hybrid
    hits = search(store, encoder, "ERR_4021", mode="keyword", where="*.md")

Hybrid search asks both indexes for ``candidates`` hits and fuses them. A cosine and a BM25 score live on
different scales, so each list's scores are first standardised over that list (z-scores: minus the list's mean,
over its standard deviation), then mixed with ``weights=(dense, keyword)`` (equal by default); a chunk that one
list did not return gets that list's lowest z-score. Standardising keeps how far a hit stands out: a rare name
puts one chunk several deviations above the rest of the BM25 list while cosine similarities sit close together,
and that is what ranking by position throws away. Bruch, Gai & Ingber 2023 ("An analysis of fusion functions for
hybrid retrieval") found such score fusion better than rank fusion in and out of domain. Measured here
(benchmarks/rag.py, 72 questions over twelve plays): recall@5 0.81 z-score fused, 0.69 with reciprocal rank fusion,
0.82 BM25 alone, 0.26 dense alone. Reciprocal rank fusion (Cormack, Clarke & Buettcher 2009:
``score(d) = sum_m w_m / (rrf_k + rank_m(d))``, ranks from 1, ``rrf_k = 60``) stays available as
``fusion="rrf"``.

Reranking (``rerank=llm``) rescores the fused top candidates with the chat model: how likely the question is
after the passage, the mean log-probability of its tokens (UPR, Sachan et al. 2022, "Improving Passage Retrieval
with Zero-Shot Question Generation"). No cross-encoder ships offline; asking the model "does this passage answer
the question? yes/no" and reading P(yes) (Nogueira et al. 2020) was tried first: SmolLM2-135M's P(yes) did not
separate an answering passage from an unrelated one (0.04 vs 0.06 on the test pair), its question likelihood
does (-1.2 vs -4.6).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scratchlm.rag.store import Embedder, Store

MODES = ("dense", "keyword", "hybrid")
FUSIONS = ("zscore", "rrf")
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
    score: float  # the ranking score of the mode: cosine, BM25, the fused score, or the rerank score
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
    from scratchlm.rag.ingest import token_counter

    count = token_counter(embedder)
    limit = embedder.max_tokens - len(embedder.tokenizer.encode(""))  # room left by [CLS] and [SEP]
    n = count(query)
    if n <= limit:
        return query
    words = re.findall(r"\S+\s*", query)
    lo, hi = 0, len(words)
    while lo < hi:  # the longest prefix of words that fits
        mid = (lo + hi + 1) // 2
        if count("".join(words[:mid])) <= limit:
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
        if weight == 0:  # a ranking weighted 0 takes no part (its items are not candidates either)
            continue
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + weight / (rrf_k + rank)
    return scores


def zscore_fusion(lists: list[list[tuple[int, float]]], weights: list[float]) -> dict[int, float]:
    """Fused scores of the ids in several ``(id, score)`` lists: each list's scores standardised over the list,
    mixed by ``weights``; an id missing from a list counts as that list's lowest standardised score."""
    fused: dict[int, float] = {}
    parts = []
    for hits, weight in zip(lists, weights):
        if weight == 0 or not hits:  # a list weighted 0 takes no part (its items are not candidates either)
            continue
        values = torch.tensor([score for _, score in hits], dtype=torch.float64)
        spread = float(values.std(unbiased=False)) if len(hits) > 1 else 0.0
        z = (values - values.mean()) / (spread or 1.0)
        parts.append((dict(zip((i for i, _ in hits), z.tolist())), float(z.min()), weight))
    for scores, _, _ in parts:
        fused.update(dict.fromkeys(scores, 0.0))
    for item in fused:
        fused[item] = sum(w * scores.get(item, floor) for scores, floor, w in parts)
    return fused


def search(store: Store, embedder: Embedder, query: str, k: int = 5, mode: str = "hybrid",
           where: str | None = None, weights: tuple[float, float] = (1.0, 1.0), fusion: str = "zscore",
           rrf_k: int = RRF_K, candidates: int | None = None, rerank=None, rerank_top: int = 20,
           warn: Callable[[str], None] | None = None) -> list[Hit]:
    """The ``k`` best chunks for ``query``: ``mode`` dense, keyword or hybrid; ``where`` a glob on the source
    path; ``weights`` (dense, keyword) and ``fusion`` (``zscore`` or ``rrf``) for hybrid; ``rerank`` an ``LLM``
    that rescores the top ``rerank_top``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, not {fusion!r}")
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
    elif fusion == "zscore":
        fused = zscore_fusion([dense, keyword], list(weights))
        ranked = sorted(fused.items(), key=lambda item: (-item[1], item[0]))
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


RERANK_PROMPT = "Passage: {passage}\n\nWrite a question that this passage answers."


@torch.no_grad()
def relevance(llm, question: str, passage: str, max_passage_tokens: int = 384) -> float:
    """Mean log-probability of the question's tokens given the passage, under the chat model (UPR)."""
    tok = llm.tokenizer
    ids = tok.encode(passage)
    if len(ids) > max_passage_tokens:
        passage = tok.decode(ids[:max_passage_tokens])
    prefix = llm.encode_chat([{"role": "user", "content": RERANK_PROMPT.format(passage=passage)}])
    question_ids = tok.encode(question)
    logits = llm.model(torch.tensor([prefix + question_ids]))[0, len(prefix) - 1:-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(question_ids)[:, None])
    return float(logp.mean())


def rerank_hits(llm, question: str, hits: list[Hit]) -> list[Hit]:
    """``hits`` reordered by :func:`relevance` (ties keep the retrieval order); ``score`` becomes it."""
    scored = sorted(((relevance(llm, question, h.text), n, h) for n, h in enumerate(hits)),
                    key=lambda s: (-s[0], s[1]))
    for p, _, h in scored:
        h.score = p
    return [h for _, _, h in scored]
