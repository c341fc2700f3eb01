"""``scratchlm tokenizer train``: train a byte-level BPE tokenizer on your text and save it as tokenizer.json.

    scratchlm tokenizer train plays.txt --vocab-size 8192 --out tok/
    scratchlm tokenizer train notes/ chats.jsonl --vocab-size 4096 --out tok/ --special "<|endoftext|>" "<|pad|>"

The result (``DIR/tokenizer.json``, plus ``DIR/tokenizer_config.json`` naming the EOS token) loads with
``Tokenizer.from_file``, HF ``tokenizers`` and ``scratchlm train --tokenizer DIR``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

DEFAULT_SPECIALS = ["<|endoftext|>"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``tokenizer`` subcommand (with its ``train`` action)."""
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer", description=__doc__.split("\n\n")[0])
    actions = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = actions.add_parser("train", help="train a byte-level BPE (GPT-4 pre-tokenizer) on text files",
                           description=__doc__.split("\n\n")[0])
    t.add_argument("files", nargs="+", metavar="FILES",
                   help="text files, folders of .txt/.md files, or .jsonl files")
    t.add_argument("--vocab-size", type=int, required=True,
                   help="tokens in the result, the 256 bytes and the special tokens included")
    t.add_argument("--out", required=True, help="directory to write tokenizer.json to")
    t.add_argument("--special", nargs="+", action="extend", default=None, metavar="TOKEN",
                   help="special tokens, given the last ids (default: <|endoftext|>); the first is the EOS token")
    t.add_argument("--text-field", default="text", help="JSONL field holding the text (default 'text')")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_tokenizer_train)


def train_tokenizer_files(files: Sequence[str | Path], vocab_size: int, out: str | Path,
                          special_tokens: Sequence[str] = tuple(DEFAULT_SPECIALS), text_field: str = "text",
                          progress: bool = False):
    """Train a BPE tokenizer on ``files`` and write ``out/tokenizer.json`` atomically; return the Tokenizer."""
    from scratchlm.errors import DataError
    from scratchlm.files import atomic_write_json
    from scratchlm.train.bpe import train_bpe
    from scratchlm.train.sources import read_documents

    read_all = False

    def documents() -> Iterator[str]:
        nonlocal read_all
        for path in files:
            for _, text in read_documents(path, text_field):
                yield text
        read_all = True

    try:
        tokenizer = train_bpe(documents(), vocab_size, list(special_tokens), progress=progress)
    except DataError:
        if not read_all:
            raise  # a problem with one file (missing, invalid UTF-8, bad JSONL): its message names it
        names = ", ".join(str(f) for f in files)
        raise DataError(f"{names}: no text to train a tokenizer on (the files are empty or hold only special "
                        "tokens); give a corpus with some text") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer.json")
    atomic_write_json(out / "tokenizer_config.json", {"eos_token": tokenizer.eos_token})
    return tokenizer


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    specials = DEFAULT_SPECIALS if args.special is None else args.special
    tokenizer = train_tokenizer_files(args.files, args.vocab_size, args.out, specials, args.text_field,
                                      progress=not args.no_progress)
    seconds = time.perf_counter() - start
    note = "" if tokenizer.vocab_size == args.vocab_size else " (the text ran out of pairs to merge)"
    print(f"trained {tokenizer.vocab_size} tokens{note}, {len(tokenizer.merges)} merges, in {seconds:.1f} s -> "
          f"{Path(args.out) / 'tokenizer.json'}")
