"""``scratchlm tokenizer train``: train a byte-level BPE tokenizer on your text and save it as tokenizer.json.

    scratchlm tokenizer train plays.txt --vocab-size 8192 --out runs/tok
    scratchlm tokenizer train notes/ chats.jsonl --vocab-size 4096 --out runs/tok --force --special "<|pad|>"

The result (``DIR/tokenizer.json``, plus ``DIR/tokenizer_config.json`` naming the EOS token) loads with
``Tokenizer.from_file``, HF ``tokenizers`` and ``scratchlm train --tokenizer DIR``. The directory is written
whole or not at all; an existing one is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from scratchlm.cli_options import add_force_flag, add_progress_flag, show_progress

DEFAULT_SPECIALS = ["<|endoftext|>"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``tokenizer`` subcommand (with its ``train`` action)."""
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer", description=__doc__.split("\n\n")[0])
    actions = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = actions.add_parser("train", help="train a byte-level BPE (GPT-4 pre-tokenizer) or Unigram tokenizer",
                           description=__doc__.split("\n\n")[0])
    t.add_argument("files", nargs="+", metavar="FILES",
                   help="text files, folders of .txt/.md files, or .jsonl files")
    t.add_argument("--vocab-size", type=int, required=True,
                   help="tokens in the result, the 256 bytes and the special tokens included")
    t.add_argument("--out", required=True, help="directory to write tokenizer.json to (e.g. runs/tok)")
    add_force_flag(t)
    t.add_argument("--special", nargs="+", action="extend", default=None, metavar="TOKEN",
                   help="special tokens, given the last ids (default: <|endoftext|>); the first is the EOS token")
    t.add_argument("--text-field", default="text", help="JSONL field holding the text (default 'text')")
    t.add_argument("--type", choices=["bpe", "unigram"], default="bpe",
                   help="bpe (byte-level, default) or unigram (SentencePiece's Unigram LM, see docs/training.md)")
    t.add_argument("--normalization", choices=["nmt_nfkc", "nfkc", "identity"], default="nmt_nfkc",
                   help="unigram only: text normalisation (default nmt_nfkc, sentencepiece's)")
    t.add_argument("--byte-fallback", action="store_true",
                   help="unigram only: add the 256 <0x..> byte pieces so no character is unknown")
    add_progress_flag(t)
    t.set_defaults(func=cmd_tokenizer_train)


def train_tokenizer_files(files: Sequence[str | Path], vocab_size: int, out: str | Path,
                          special_tokens: Sequence[str] | None = tuple(DEFAULT_SPECIALS), text_field: str = "text",
                          progress: bool = False, force: bool = False, kind: str = "bpe",
                          normalization: str = "nmt_nfkc", byte_fallback: bool = False):
    """Train a BPE tokenizer on ``files`` and write the directory ``out`` (``tokenizer.json``,
    ``tokenizer_config.json``) atomically; an existing ``out`` is replaced only with ``force``. Returns the
    Tokenizer. ``kind="unigram"`` trains a Unigram LM tokenizer instead (``special_tokens`` None: <s>, </s>)."""
    from scratchlm.errors import DataError
    from scratchlm.files import atomic_dir, atomic_write_json, check_destination
    from scratchlm.train.bpe import train_bpe
    from scratchlm.train.sources import read_documents

    out = Path(out)
    check_destination(out, force, want_dir=True)  # before the training, not after it
    read_all = False

    def documents() -> Iterator[str]:
        nonlocal read_all
        for path in files:
            for _, text in read_documents(path, text_field):
                yield text
        read_all = True

    try:
        if kind == "unigram":
            from scratchlm.unigram_train import train_unigram

            tokenizer = train_unigram(documents(), vocab_size, None if special_tokens is None else list(special_tokens),
                                      normalization=normalization, byte_fallback=byte_fallback, progress=progress)
        else:
            tokenizer = train_bpe(documents(), vocab_size, list(special_tokens or DEFAULT_SPECIALS),
                                  progress=progress)
    except DataError:
        if not read_all:
            raise  # a problem with one file (missing, invalid UTF-8, bad JSONL): its message names it
        names = ", ".join(str(f) for f in files)
        raise DataError(f"{names}: no text to train a tokenizer on (the files are empty or hold only special "
                        "tokens); give a corpus with some text") from None
    with atomic_dir(out, force) as tmp:
        tokenizer.save(tmp / "tokenizer.json")
        config = {"eos_token": tokenizer.eos_token}
        if tokenizer.bos_token is not None:
            config["bos_token"] = tokenizer.bos_token
        atomic_write_json(tmp / "tokenizer_config.json", config)
    return tokenizer


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    specials = (DEFAULT_SPECIALS if args.type == "bpe" else None) if args.special is None else args.special
    tokenizer = train_tokenizer_files(args.files, args.vocab_size, args.out, specials, args.text_field,
                                      progress=show_progress(args), force=args.force, kind=args.type,
                                      normalization=args.normalization, byte_fallback=args.byte_fallback)
    seconds = time.perf_counter() - start
    if args.type == "unigram":
        note = "" if tokenizer.vocab_size == args.vocab_size else " (the text has too few distinct pieces)"
        print(f"trained a Unigram tokenizer of {tokenizer.vocab_size} pieces{note} in {seconds:.1f} s -> "
              f"{Path(args.out) / 'tokenizer.json'}")
        return
    note = "" if tokenizer.vocab_size == args.vocab_size else " (the text ran out of pairs to merge)"
    print(f"trained {tokenizer.vocab_size} tokens{note}, {len(tokenizer.merges)} merges, in {seconds:.1f} s -> "
          f"{Path(args.out) / 'tokenizer.json'}")
