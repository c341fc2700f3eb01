"""Near-duplicate removal: scratchlm's MinHash + LSH against datasketch's MinHashLSH on planted duplicates.

    python benchmarks/data_clean.py                  # 3,000 documents + 1,500 planted variants; appends RESULTS.md
    python benchmarks/data_clean.py --docs 500 --no-record

The corpus is generated: documents of 200-400 words drawn from a Zipf distribution over 20,000 pseudo-words
(the eight Gopher stop words the commonest; two random documents share almost no 5-word shingle), then for half
of them a variant with a share of its words replaced, deleted or inserted (0.5% to 10%), placed later in the
stream. The truth: a variant is a near-duplicate
when the exact Jaccard similarity of its 5-word shingle set with its original's is at least the threshold.

Both engines see the same stream in the same order, with the same shingles, threshold and number of
permutations, and work the same way: a document whose signature shares an LSH band with an earlier kept one is
removed, otherwise it is indexed. Precision and recall of the removals are against the truth; documents/s is
the whole loop (shingles, signature, query, insert) in this process. Exact dedup and quality rules are off,
to time the same work; a last line gives ours with every filter on.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from datetime import datetime, timezone

import numpy as np
from common import append_results, machine

from scratchlm.data.clean import CleanOptions, Document, clean_documents
from scratchlm.data.minhash import jaccard, shingle_hashes
from scratchlm.data.quality import GOPHER_STOP_WORDS

EDIT_RATES = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.05, 0.10)


def make_corpus(n_docs: int, seed: int) -> tuple[list[str], list[int], list[float]]:
    """(texts, index of each text's original or -1, exact Jaccard with that original or 0)."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"]
    vocabulary = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(30_000)})
    vocabulary = list(GOPHER_STOP_WORDS) + vocabulary[:20_000 - len(GOPHER_STOP_WORDS)]  # the commonest: English
    ranks = np.arange(1, len(vocabulary) + 1)
    zipf = (1.0 / ranks) / (1.0 / ranks).sum()
    originals = []
    for _ in range(n_docs):
        words = np_rng.choice(len(vocabulary), size=rng.randint(200, 400), p=zipf)
        originals.append([vocabulary[i] for i in words])
    texts = [" ".join(w) for w in originals]
    source, similarity = [-1] * n_docs, [0.0] * n_docs
    for k in range(n_docs // 2):
        words = list(originals[k])
        rate = EDIT_RATES[k % len(EDIT_RATES)]
        for _ in range(max(1, round(rate * len(words)))):
            i = rng.randrange(len(words))
            kind = rng.random()
            if kind < 0.5:
                words[i] = rng.choice(vocabulary)
            elif kind < 0.75:
                del words[i]
            else:
                words.insert(i, rng.choice(vocabulary))
        text = " ".join(words)
        texts.append(text)
        source.append(k)
        similarity.append(jaccard(shingle_hashes(texts[k]), shingle_hashes(text)))
    return texts, source, similarity


def run_ours(texts: list[str], threshold: float, num_perm: int, verify: bool = False) -> tuple[set[int], float]:
    options = CleanOptions(exact=False, quality=None, threshold=threshold, num_perm=num_perm, examples=0,
                           verify=verify)
    removed: set[int] = set()
    order = iter(range(len(texts)))
    kept_before = [0]

    def on_document(kept: int) -> None:
        i = next(order)
        if kept == kept_before[0]:
            removed.add(i)
        kept_before[0] = kept

    start = time.perf_counter()
    clean_documents((Document(t, "bench", i + 1) for i, t in enumerate(texts)), None, options, on_document)
    return removed, time.perf_counter() - start


def run_datasketch(texts: list[str], threshold: float, num_perm: int) -> tuple[set[int], float]:
    import regex
    from datasketch import MinHash, MinHashLSH

    word = regex.compile(r"\w+")
    removed: set[int] = set()
    start = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    for i, text in enumerate(texts):
        words = word.findall(text.casefold())
        shingles = {" ".join(words[j:j + 5]).encode() for j in range(max(1, len(words) - 4))}
        m = MinHash(num_perm=num_perm)
        m.update_batch(list(shingles))
        if lsh.query(m):
            removed.add(i)
        else:
            lsh.insert(i, m)
    return removed, time.perf_counter() - start


def scores(removed: set[int], truth: set[int]) -> tuple[float, float]:
    hits = len(removed & truth)
    return hits / max(1, len(removed)), hits / max(1, len(truth))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=3000, help="original documents (half get a variant)")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    texts, source, similarity = make_corpus(args.docs, args.seed)
    truth = {i for i, s in enumerate(similarity) if source[i] >= 0 and s >= args.threshold}
    print(f"{len(texts)} documents, {len(truth)} true near-duplicates (Jaccard >= {args.threshold})", file=sys.stderr)

    rows = []
    def verified(texts, threshold, num_perm):
        return run_ours(texts, threshold, num_perm, verify=True)

    for name, run in (("scratchlm", run_ours), ("datasketch", run_datasketch), ("scratchlm --verify", verified)):
        run(texts[:200], args.threshold, args.num_perm)  # warm-up
        removed, seconds = run(texts, args.threshold, args.num_perm)
        precision, recall = scores(removed, truth)
        rows.append((name, removed, precision, recall, len(texts) / seconds))
    (_, ours, p1, r1, s1), (_, theirs, p2, r2, s2), (_, checked, p3, r3, s3) = rows

    buckets = [(0.0, 0.6), (0.6, 0.7), (0.7, 0.75), (0.75, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 1.01)]
    curve = []
    for low, high in buckets:
        members = [i for i, s in enumerate(similarity) if source[i] >= 0 and low <= s < high]
        if members:
            curve.append((f"{low:.2f}-{min(high, 1.0):.2f}", len(members),
                          *(sum(i in removed for i in members) / len(members) for removed in (ours, theirs, checked))))

    full = CleanOptions(threshold=args.threshold, num_perm=args.num_perm, examples=0)
    start = time.perf_counter()
    report = clean_documents((Document(t, "bench", i + 1) for i, t in enumerate(texts)), None, full)
    full_rate = len(texts) / (time.perf_counter() - start)

    load = os.getloadavg()[0]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## Data curation: near-duplicate removal vs datasketch, {when}\n",
        f"{machine()}, load average {load:.1f} at the start; `python benchmarks/data_clean.py --docs {args.docs}`; "
        f"{len(texts)} generated documents, {len(truth)} planted near-duplicates with Jaccard >= {args.threshold} "
        f"(5-word shingles, {args.num_perm} permutations; both pick {report['lsh']['bands']} bands x "
        f"{report['lsh']['rows']} rows)\n",
        "| engine | removed | precision | recall | documents/s | ratio |",
        "|---|---|---|---|---|---|",
        f"| scratchlm | {len(ours)} | {p1:.3f} | {r1:.3f} | {s1:,.0f} | **{s1 / s2:.2f}x** |",
        f"| datasketch MinHashLSH | {len(theirs)} | {p2:.3f} | {r2:.3f} | {s2:,.0f} | 1.00x |",
        f"| scratchlm --verify | {len(checked)} | {p3:.3f} | {r3:.3f} | {s3:,.0f} | {s3 / s2:.2f}x |",
        "",
        "Share of the variants removed, by their exact Jaccard similarity with their original "
        f"(the S-curve 1 - (1 - s^{report['lsh']['rows']})^{report['lsh']['bands']} in practice):\n",
        "| exact Jaccard | variants | scratchlm | datasketch | scratchlm --verify |",
        "|---|---|---|---|---|",
        *(f"| {label} | {n} | {a:.2f} | {b:.2f} | {c:.2f} |" for label, n, a, b, c in curve),
        "",
        f"Whole pipeline (exact dedup + Gopher rules + near dedup), same corpus: {full_rate:,.0f} documents/s "
        f"({report['documents_kept']} kept).\n",
    ]
    text = "\n".join(lines)
    print(text)
    if load > 2.5:
        print(f"note: load average {load:.1f} on {os.cpu_count()} cores: rerun on a quiet machine for final "
              "documents/s", file=sys.stderr)
    if not args.no_record:
        append_results(text)


if __name__ == "__main__":
    main()
