"""Word embeddings on the bundled Shakespeare: ours (skip-gram, autoencoder) against gensim's Word2Vec.

Same tokens, same settings (skip-gram, vector size, window, min_count, subsampling, negatives, epochs). Reports the
training time of each, and the neighbour overlap: for each probe word (the 200 most frequent after the 50 most
frequent), the share of its 10 nearest neighbours that two embeddings have in common. Two gensim runs that differ
only in their seed set the ceiling (word2vec is random: even gensim does not agree with itself); k / V is chance.

    python benchmarks/word2vec.py                  # full corpus, 5 epochs; appends to RESULTS.md
    python benchmarks/word2vec.py --no-append --chars 300000 --epochs 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from importlib.resources import files

import torch
from common import append_results, machine

from scratchlm.lessons.autoencoder import train_autoencoder_embedding
from scratchlm.lessons.vectors import WordVectors, neighbour_overlap, probe_words, tokenize_words
from scratchlm.lessons.word2vec import Word2VecConfig, train_word2vec

ANALOGIES = [("man", "woman", "king"), ("he", "she", "his"), ("father", "mother", "son"), ("lord", "lady", "sir")]


def gensim_vectors(tokens: list[str], config: Word2VecConfig, seed: int, workers: int) -> WordVectors:
    from gensim.models import Word2Vec

    # gensim reads sentences of at most 10,000 words; windows do not cross them (a negligible edge effect here).
    sentences = [tokens[i:i + 10_000] for i in range(0, len(tokens), 10_000)]
    model = Word2Vec(sentences, vector_size=config.vector_size, window=config.window, min_count=config.min_count,
                     sample=config.sample, negative=config.negative, ns_exponent=config.ns_exponent, sg=1,
                     epochs=config.epochs, seed=seed, workers=workers)
    return WordVectors(model.wv.index_to_key, torch.tensor(model.wv.vectors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=None, help="use the first N characters of the corpus")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--k", type=int, default=10, help="neighbours compared per word")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    text = files("scratchlm").joinpath("data/shakespeare.txt").read_text(encoding="utf-8")[:args.chars]
    tokens = tokenize_words(text)
    config = Word2VecConfig(epochs=args.epochs)

    timings = {}
    start = time.perf_counter()
    ours, _ = train_word2vec(tokens, config, progress=True)
    timings["scratchlm skip-gram"] = time.perf_counter() - start
    start = time.perf_counter()
    auto, _ = train_autoencoder_embedding(tokens, min_count=config.min_count, window=config.window)
    timings["scratchlm autoencoder"] = time.perf_counter() - start
    start = time.perf_counter()
    g1 = gensim_vectors(tokens, config, seed=1, workers=args.threads)
    timings["gensim skip-gram (seed 1)"] = time.perf_counter() - start
    g2 = gensim_vectors(tokens, config, seed=2, workers=args.threads)

    words = probe_words(ours, 200, 50)
    lists = {name: v.neighbours(words, args.k) for name, v in
             (("ours", ours), ("auto", auto), ("g1", g1), ("g2", g2))}
    pairs = [("scratchlm skip-gram vs gensim", "ours", "g1"), ("scratchlm autoencoder vs gensim", "auto", "g1"),
             ("gensim seed 1 vs gensim seed 2 (ceiling)", "g1", "g2"),
             ("scratchlm autoencoder vs scratchlm skip-gram", "auto", "ours")]
    rows = [(label, neighbour_overlap(lists[a], lists[b])) for label, a, b in pairs]
    chance = args.k / (len(ours) - 1)

    lines = [f"\n## Word embeddings on Shakespeare: scratchlm vs gensim, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n",
             f"{machine()}; load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; "
             f"`python benchmarks/{os.path.basename(sys.argv[0])} {' '.join(sys.argv[1:])}`".rstrip() + "\n",
             f"{len(tokens):,} words, vocabulary {len(ours):,} (min_count {config.min_count}); skip-gram, "
             f"{config.vector_size} dimensions, window {config.window}, sample {config.sample}, "
             f"{config.negative} negatives, {config.epochs} epochs, {args.threads} threads\n",
             "| run | training time (s) |", "|---|---|"]
    lines += [f"| {name} | {t:.1f} |" for name, t in timings.items()]
    lines += ["", f"Overlap of the {args.k} nearest neighbours over {len(words)} probe words "
              f"(chance {chance:.3f}):", "", "| embeddings compared | overlap |", "|---|---|"]
    lines += [f"| {label} | {value:.3f} |" for label, value in rows]
    lines += ["", "| analogy | scratchlm skip-gram | gensim |", "|---|---|---|"]
    for a, b, c in ANALOGIES:
        if all(w in ours and w in g1 for w in (a, b, c)):
            lines.append(f"| {a} : {b} = {c} : ? | {', '.join(w for w, _ in ours.analogy(a, b, c, 3))} | "
                         f"{', '.join(w for w, _ in g1.analogy(a, b, c, 3))} |")
    lines += ["", "| word | scratchlm skip-gram | gensim | scratchlm autoencoder |", "|---|---|---|---|"]
    for word in ("king", "love", "night", "sword", "france"):
        if word in ours and word in g1 and word in auto:
            lines.append(f"| {word} | {', '.join(w for w, _ in ours.most_similar(word, 5))} | "
                         f"{', '.join(w for w, _ in g1.most_similar(word, 5))} | "
                         f"{', '.join(w for w, _ in auto.most_similar(word, 5))} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.no_append:
        append_results(report)


if __name__ == "__main__":
    main()
