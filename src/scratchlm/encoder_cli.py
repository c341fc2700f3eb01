"""``scratchlm embed MODEL TEXT... | --file F [--json]``: sentence embeddings from an encoder model.

    scratchlm pull all-minilm-l6-v2
    scratchlm embed all-minilm-l6-v2 "a cat sat on the mat" "a dog lay on the rug" "stock prices fell"
    scratchlm embed all-minilm-l6-v2 --file notes.txt --json > vectors.json

Without ``--json`` it prints, for each text, its token count and the first values of its vector, then the
cosine similarity of every pair (up to 10 texts). With ``--json`` it prints one JSON array holding the vectors
in input order.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from scratchlm.cli_options import add_model_argument, add_progress_flag, add_threads_flag, show_progress
from scratchlm.errors import ConfigError, DataError


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="sentence embeddings of texts from an encoder (all-minilm-l6-v2)")
    add_model_argument(p)
    p.add_argument("texts", nargs="*", help="texts to embed (or use --file)")
    p.add_argument("--file", default=None,
                   help="a UTF-8 text file, one text per line (blank lines skipped); - for stdin")
    p.add_argument("--json", action="store_true", help="print the vectors as one JSON array, in input order")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    add_threads_flag(p)
    add_progress_flag(p)
    p.set_defaults(func=cmd_embed)


def read_texts(args: argparse.Namespace) -> list[str]:
    """The texts from the command line and from ``--file`` (one per non-blank line)."""
    texts = list(args.texts)
    if args.file is not None:
        try:
            if args.file == "-":
                content = sys.stdin.read()
            else:
                with open(args.file, encoding="utf-8") as f:
                    content = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {args.file}: {exc}") from None
        texts += [line for line in content.splitlines() if line.strip()]
    if not texts:
        raise ConfigError("nothing to embed: give texts after the model name, or --file FILE")
    return texts


def cmd_embed(args: argparse.Namespace) -> None:
    from scratchlm.encoder import Encoder
    from scratchlm.progress import stage

    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    texts = read_texts(args)
    with stage(f"loading {args.model}", show_progress(args)):
        encoder = Encoder.load(args.model)
    with warnings.catch_warnings(record=True) as caught:  # one plain line each, not Python's warning format
        warnings.simplefilter("always")
        vectors = encoder.embed(texts, batch_size=args.batch_size)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if args.json:
        json.dump(vectors.tolist(), sys.stdout)
        sys.stdout.write("\n")
        return
    print(f"{encoder.name}: {len(texts)} texts -> {len(texts)} x {encoder.dim} "
          f"({encoder.pooling} pooling{', unit length' if encoder.normalize else ''})")
    for i, (text, vector) in enumerate(zip(texts, vectors)):
        head = " ".join(f"{x:+.4f}" for x in vector[:4].tolist())
        shown = text if len(text) <= 50 else text[:47] + "..."
        print(f"[{i}] {len(encoder.tokenizer.encode(text)):>4} tokens  [{head} ...]  {shown!r}")
    if 2 <= len(texts) <= 10:
        unit = vectors / vectors.norm(dim=1, keepdim=True).clamp(min=1e-12)
        sims = unit @ unit.T
        print("\ncosine similarity")
        print("     " + "".join(f"{j:>7}" for j in range(len(texts))))
        for i in range(len(texts)):
            print(f"[{i}]  " + "".join(f"{sims[i, j].item():7.3f}" for j in range(len(texts))))
