"""``scratchlm seq2seq``: train an encoder-decoder translator, translate with it, score it with BLEU.

    scratchlm seq2seq train --out runs/seq2seq                  # English number phrases -> French, a few minutes
    scratchlm seq2seq train --out runs/seq2seq --resume         # continue it (same data and options)
    scratchlm seq2seq train data/pairs/ --out runs/mine         # your pairs: train.tsv (valid.tsv, test.tsv)
    scratchlm seq2seq translate runs/seq2seq "seventy-one thousand eighty" --beam 4
    scratchlm seq2seq bleu runs/seq2seq                         # BLEU on the number task's held-out split
"""

from __future__ import annotations

import argparse
import sys

# flag -> (TrainConfig field, type, help)
TRAIN_FLAGS = {
    "--max-steps": ("max_steps", int, "optimizer steps (default 1000)"),
    "--batch-size": ("batch_size", int, "pairs per step (default 64)"),
    "--lr": ("lr", float, "peak learning rate (default 1e-3)"),
    "--warmup-steps": ("warmup_steps", int, "linear warm-up steps (default 100)"),
    "--eval-interval": ("eval_interval", int, "evaluate, report BLEU and checkpoint every this many steps"),
    "--seed": ("seed", int, "random seed (weights, batches, validation split of a single file)"),
}
# flag -> (Seq2SeqConfig field, type, help)
MODEL_FLAGS = {
    "--d-model": ("d_model", int, "width of the residual stream (default 128)"),
    "--n-heads": ("n_heads", int, "attention heads (default 4)"),
    "--encoder-layers": ("n_encoder_layers", int, "encoder blocks (default 3)"),
    "--decoder-layers": ("n_decoder_layers", int, "decoder blocks (default 3)"),
    "--d-ff": ("d_ff", int, "MLP width (default 512)"),
    "--max-source-length": ("max_source_length", int, "longest source in tokens (default 32)"),
    "--max-target-length": ("max_target_length", int, "decoder positions: longest target + 1 (default 32)"),
    "--dropout": ("dropout", float, "dropout while training (default 0)"),
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``scratchlm seq2seq train|translate|bleu``."""
    examples = __doc__.split("\n\n", 1)[1].split('"""')[0]
    parser = sub.add_parser("seq2seq", help="encoder-decoder translator: train, translate, bleu",
                            description="An encoder-decoder transformer (Vaswani et al. 2017) trained on pairs of "
                                        "texts; by default English number phrases into French.",
                            epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="seq2seq_command", required=True, metavar="VERB")

    p = verbs.add_parser("train", help="train a translator (default: English numbers into French)",
                         description="Train a translator through the shared training loop. OUT/run.json records "
                                     "the run, so --resume needs no other flags; with --resume only --max-steps, "
                                     "--eval-interval, --bleu-pairs, --beam and --device may change.")
    p.add_argument("data", nargs="?", default=None,
                   help="a folder with train.tsv (and valid.tsv, test.tsv), or one .tsv/.jsonl file of pairs "
                        "(default: the bundled number task)")
    p.add_argument("--out", default="runs/seq2seq", help="output folder (default runs/seq2seq)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT with its recorded options")
    p.add_argument("--force", action="store_true", help="replace a previous run in OUT")
    for flag, (_, kind, text) in {**TRAIN_FLAGS, **MODEL_FLAGS}.items():
        p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument("--positions", choices=["sinusoidal", "learned"], default=None, help="default sinusoidal")
    p.add_argument("--post-norm", action="store_true", help="norms after each sublayer, as in the paper")
    p.add_argument("--no-cross-attention", action="store_true",
                   help="an ablation: the decoder never sees the source (it cannot learn to translate)")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE tokens per side (default 512)")
    p.add_argument("--shared-vocab", action="store_true", help="one tokenizer and embedding for both sides")
    p.add_argument("--bleu-pairs", type=int, default=None, help="validation pairs translated per evaluation "
                                                                "(default 200, 0: none)")
    p.add_argument("--beam", type=int, default=None, help="beam size of the final test evaluation (default 4)")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("translate", help="translate texts (arguments, or one per stdin line)")
    p.add_argument("model", help="a folder written by `scratchlm seq2seq train` (or one of its checkpoints)")
    p.add_argument("texts", nargs="*", help="texts to translate (default: read lines from stdin)")
    p.add_argument("--beam", type=int, default=1, help="beam size (1: greedy search, the default)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search ranks by log-probability / length ** this (default 1)")
    p.set_defaults(func=cmd_translate)

    p = verbs.add_parser("bleu", help="corpus BLEU (sacreBLEU's) and exact match of a translator on pairs")
    p.add_argument("model", help="a folder written by `scratchlm seq2seq train`")
    p.add_argument("data", nargs="?", default=None,
                   help="a .tsv/.jsonl file of pairs, or a data folder (default: the number task)")
    p.add_argument("--split", default="test", help="which split of a data folder (default test)")
    p.add_argument("--beam", type=int, default=1, help="beam size (default 1, greedy)")
    p.set_defaults(func=cmd_bleu)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def cmd_train(args: argparse.Namespace) -> None:
    from scratchlm.seq2seq.run import Seq2SeqOptions, train_translator

    def given(flags: dict) -> dict:
        return {name: getattr(args, _dest(flag)) for flag, (name, _, _) in flags.items()
                if getattr(args, _dest(flag)) is not None}

    model = given(MODEL_FLAGS)
    if args.positions is not None:
        model["positions"] = args.positions
    if args.post_norm:
        model["norm_position"] = "post"
    if args.no_cross_attention:
        model["cross_attention"] = False
    train_translator(Seq2SeqOptions(
        data=args.data, out=args.out, model=model, train=given(TRAIN_FLAGS), vocab_size=args.vocab_size,
        shared_vocab=True if args.shared_vocab else None, bleu_pairs=args.bleu_pairs, beam_size=args.beam,
        resume=args.resume, force=args.force, device=args.device, progress=not args.no_progress,
    ))


def cmd_translate(args: argparse.Namespace) -> None:
    from scratchlm.seq2seq.translator import Translator

    translator = Translator.load(args.model)
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for line in translator.translate(texts, beam_size=args.beam, length_penalty=args.length_penalty):
        print(line, flush=True)


def cmd_bleu(args: argparse.Namespace) -> None:
    from pathlib import Path

    from scratchlm.errors import DataError
    from scratchlm.seq2seq.data import load_pairs, read_pairs
    from scratchlm.seq2seq.translator import Translator

    translator = Translator.load(args.model)
    if args.data is not None and Path(args.data).is_file():
        pairs = read_pairs(args.data)
    else:
        splits = load_pairs(args.data)
        if args.split not in splits:
            raise DataError(f"{args.data or 'the number task'} has no {args.split!r} split; it has "
                            f"{', '.join(splits)}")
        pairs = splits[args.split]
    scores = translator.bleu(pairs, beam_size=args.beam)
    print(f"BLEU {scores['bleu']:.2f}  exact match {scores['exact_match']:.1%}  ({len(pairs):,} pairs, "
          f"{'greedy' if args.beam == 1 else f'beam {args.beam}'})")
