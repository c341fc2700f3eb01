"""Unigram tokenizer training: compression of scratchlm's trainer against sentencepiece's, same vocabulary size.

    .venv/bin/python benchmarks/unigram.py              # prints the table
    .venv/bin/python benchmarks/unigram.py --record     # ... and appends it to benchmarks/RESULTS.md

Both trainers get the first 90% of the bundled corpus's lines (sentencepiece's defaults: nmt_nfkc,
character_coverage 0.9995, max piece length 16, shrinking factor 0.75, 2 EM sub-iterations; one thread) and
are measured on the last 10%, each line encoded on its own: characters per token (higher is better
compression) and the ratio of token counts (scratchlm / sentencepiece; 1.00 is equal, the target is within
2%). The same run checks that scratchlm's *encoder*, given sentencepiece's trained ``.model``, gives
sentencepiece's ids on every held-out line, and times both trainers (ratio only; the corpus is small).
"""

from __future__ import annotations

import argparse
import datetime
import io
import sys
import tempfile
import time
from pathlib import Path

from common import append_results, machine

VOCAB_SIZES = (1000, 4000, 8000)


def run(train: list[str], held_out: list[str], vocab_size: int) -> dict:
    import sentencepiece as spm

    from scratchlm.unigram import Unigram
    from scratchlm.unigram_train import train_unigram

    start = time.perf_counter()
    ours = train_unigram(train, vocab_size)
    ours_s = time.perf_counter() - start
    buffer = io.BytesIO()
    start = time.perf_counter()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(train), model_writer=buffer, model_type="unigram",
                                   vocab_size=vocab_size, num_threads=1, minloglevel=2)
    sp_s = time.perf_counter() - start
    sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    sp_ids = sp.encode(held_out)
    ours_tokens = sum(len(ours.encode(line)) for line in held_out)
    sp_tokens = sum(map(len, sp_ids))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "m.model").write_bytes(buffer.getvalue())
        loaded = Unigram.from_file(Path(tmp) / "m.model")
    same = sum(loaded.encode(line, allowed_special="none") == ids for line, ids in zip(held_out, sp_ids))
    chars = sum(map(len, held_out))
    return {"vocab": vocab_size, "ours_cpt": chars / ours_tokens, "sp_cpt": chars / sp_tokens,
            "ratio": ours_tokens / sp_tokens, "ours_s": ours_s, "sp_s": sp_s, "same": same, "lines": len(held_out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=list(VOCAB_SIZES))
    args = parser.parse_args()
    from scratchlm.train.sources import bundled_corpus

    lines = bundled_corpus().read_text(encoding="utf-8").splitlines()
    cut = int(len(lines) * 0.9)
    train, held_out = lines[:cut], [line for line in lines[cut:] if line.strip()]
    rows = []
    for vocab_size in args.vocab_sizes:
        rows.append(run(train, held_out, vocab_size))
        print(f"vocabulary {vocab_size}: done", file=sys.stderr)
    table = [
        f"Unigram training on the bundled corpus (first 90% of lines, {sum(map(len, train)):,} characters); "
        f"compression on the other {len(held_out):,} lines:",
        "",
        "| vocabulary | chars/token scratchlm | chars/token sentencepiece | tokens scratchlm / sentencepiece | "
        "training s scratchlm | training s sentencepiece | time ratio | sentencepiece's model, our ids equal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(f"| {r['vocab']:,} | {r['ours_cpt']:.4f} | {r['sp_cpt']:.4f} | {r['ratio']:.4f} | "
                     f"{r['ours_s']:.1f} | {r['sp_s']:.1f} | {r['ours_s'] / r['sp_s']:.1f}x | "
                     f"{r['same']}/{r['lines']} lines |")
    text = "\n".join(table)
    print(text)
    if args.record:
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        append_results(f"\n## Unigram tokenizer training against sentencepiece, {when}\n\n{machine()}; "
                       f"`python benchmarks/unigram.py`\n\n{text}\n")


if __name__ == "__main__":
    main()
