"""``scratchlm seq2seq train``: pairs -> tokenizers -> encoder-decoder -> the shared training loop -> BLEU.

    result = train_translator(Seq2SeqOptions(out="runs/seq2seq"))            # the bundled number task
    result = train_translator(Seq2SeqOptions(out="runs/seq2seq", resume=True, train={"max_steps": 6000}))

Training is ``scratchlm.train.loop.train``, as for every model here: the progress bar, ``metrics.jsonl`` and
``loss.png`` (``TrainingReport``), the ``best``/``last`` checkpoints with optimizer and RNG states, exact resume.
Each evaluation also translates part of the validation split greedily and reports its BLEU. At the end the test
split (when the data has one) is translated greedily and with a beam, and the scores go to ``OUT/results.json``.

Files in ``out``: ``run.json`` (the options, so ``--resume`` needs no flags), ``tokenizers/``, ``last/`` and
``best/`` (translator folders, see translator.py, plus the trainer state), ``metrics.jsonl``, ``loss.png``,
``results.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from scratchlm.errors import ConfigError, TrainingError
from scratchlm.files import atomic_write_json
from scratchlm.seq2seq.data import (
    BOS,
    EOS,
    PairBatches,
    encode_pairs,
    encode_source,
    fixed_batches,
    load_pairs,
    special_ids,
    train_tokenizers,
)
from scratchlm.seq2seq.model import Seq2Seq, Seq2SeqConfig
from scratchlm.seq2seq.translator import TOKENIZER_FILES, Translator, load_weights, save_translator
from scratchlm.tokenizer import Tokenizer
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.distributed import init_distributed
from scratchlm.train.loop import TrainConfig, evaluate, train
from scratchlm.train.record import describe_changes, merge_given, read_record, write_record
from scratchlm.train.report import TrainingReport

COMMAND = "seq2seq train"
# The defaults reach the BLEU in docs/seq2seq.md on the number task in minutes on 2 CPU cores (benchmarks/seq2seq.py).
DEFAULT_MODEL = {"d_model": 128, "n_heads": 4, "n_encoder_layers": 3, "n_decoder_layers": 3, "d_ff": 512,
                 "max_source_length": 32, "max_target_length": 32, "positions": "sinusoidal", "dropout": 0.0,
                 "norm_position": "pre", "cross_attention": True}
DEFAULT_TRAIN = TrainConfig(max_steps=1000, batch_size=64, lr=1e-3, min_lr=1e-4, warmup_steps=100, weight_decay=0.01,
                            beta2=0.98, grad_clip=1.0, eval_interval=250, eval_batches=8)
DEFAULT_VOCAB = 512
MODEL_FIELDS = tuple(DEFAULT_MODEL)
TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig))
# What may change on --resume: the length of the run, how often it evaluates, where it runs.
CHANGEABLE = ("max_steps", "eval_interval", "early_stopping", "bleu_pairs", "beam_size", "device", "compile")


@dataclass
class Seq2SeqOptions:
    """Everything ``scratchlm seq2seq train`` can be told; None means "not given" (the default for a new run,
    the recorded value with ``resume``)."""

    data: str | Path | None = None  # a folder with train.tsv (valid.tsv, test.tsv) or one file; None: numbers
    out: str | Path = "runs/seq2seq"
    model: dict = field(default_factory=dict)  # Seq2SeqConfig fields of DEFAULT_MODEL to change
    train: dict = field(default_factory=dict)  # TrainConfig fields to change
    vocab_size: int | None = None  # BPE tokens per side (special tokens included)
    shared_vocab: bool | None = None  # one tokenizer and one embedding matrix for both sides
    bleu_pairs: int | None = None  # validation pairs translated at each evaluation (0: none); None: 200
    beam_size: int | None = None  # the beam of the final test evaluation; None: 4
    resume: bool = False
    force: bool = False
    device: str | None = None  # cpu, cuda or auto (default)
    progress: bool = True


def resolve_options(opts: Seq2SeqOptions) -> dict:
    """Every option of a new run, resolved (given, else default): what ``run.json`` records."""
    for what, given, allowed in (("model", opts.model, MODEL_FIELDS), ("train", opts.train, TRAIN_FIELDS)):
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ConfigError(f"Seq2SeqOptions.{what} has fields it does not take: {unknown}; allowed: "
                              f"{', '.join(allowed)}")
    train_config = replace(DEFAULT_TRAIN, **opts.train)  # validated by TrainConfig
    return {
        "data": str(Path(opts.data).expanduser().resolve()) if opts.data is not None else None,
        "vocab_size": opts.vocab_size if opts.vocab_size is not None else DEFAULT_VOCAB,
        "shared_vocab": bool(opts.shared_vocab),
        "bleu_pairs": 200 if opts.bleu_pairs is None else opts.bleu_pairs,
        "beam_size": 4 if opts.beam_size is None else opts.beam_size,
        "device": opts.device or "auto",
        **train_config.to_dict(), **{**DEFAULT_MODEL, **opts.model},
    }


def given_options(opts: Seq2SeqOptions) -> dict:
    """The options given now, in ``resolve_options``'s form, None for those not given."""
    return {"data": str(Path(opts.data).expanduser().resolve()) if opts.data is not None else None,
            "vocab_size": opts.vocab_size, "shared_vocab": opts.shared_vocab, "bleu_pairs": opts.bleu_pairs,
            "beam_size": opts.beam_size, "device": opts.device, **opts.train, **opts.model}


def fingerprint(pairs: dict[str, list[tuple[str, str]]]) -> str:
    """A hash of every split's pairs: a resumed run must train on the same data."""
    digest = hashlib.sha256()
    for split in sorted(pairs):
        digest.update(json.dumps([split, pairs[split]], ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def clear_out_dir(out: Path, force: bool) -> None:
    """Empty ``out`` of a previous run's files, refusing without ``force`` when it holds a checkpoint."""
    existing = ckpt.resolve_checkpoint(out / "last")
    if existing is not None and not force:
        step = ckpt.read_trainer_state(existing).get("step")
        raise TrainingError(f"{out} already holds a seq2seq run (checkpoint at step {step}): continue it with "
                            f"`scratchlm seq2seq train --out {out} --resume`, replace it with --force, or write the "
                            "new run elsewhere with --out ANOTHER_DIR")
    for name in ("last", "best", ".last.old", ".best.old", "tokenizers"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "loss.png", "run.json", "results.json"):
        (out / name).unlink(missing_ok=True)


def train_translator(opts: Seq2SeqOptions, say=print) -> dict:
    """Train (or resume) a translator as ``opts`` says; returns the final scores (also in ``OUT/results.json``)."""
    out = Path(opts.out)
    pairs_key = None
    if opts.resume:
        if ckpt.resolve_checkpoint(out / "last") is None:
            raise TrainingError(f"no checkpoint to resume from in {out / 'last'}: start the run without --resume "
                                "(a run writes its first checkpoint at its first evaluation)")
        record = read_record(out, COMMAND)
        if record is None:
            raise TrainingError(f"{out} has no run.json: it was not written by `scratchlm seq2seq train`")
        options = merge_given(out, COMMAND, record["options"], given_options(opts), CHANGEABLE)
        changes = describe_changes(record["options"], options)
        pairs_key = record.get("pairs")
        tokenizers = [Tokenizer.from_file(out / "tokenizers" / name, bos_token=BOS, eos_token=EOS)
                      for name in TOKENIZER_FILES]
        say(f"resuming {out}" + (f"; changed: {changes}" if changes else ""))
    else:
        options = resolve_options(opts)
        clear_out_dir(out, opts.force)
    pairs = load_pairs(options["data"], seed=options["seed"])
    if pairs_key is not None and fingerprint(pairs) != pairs_key:
        raise TrainingError(f"the data of {out} changed since the run started: resume needs the same pairs; start a "
                            "new run (--force or another --out)")
    if not opts.resume:
        tokenizers = train_tokenizers(pairs["train"], options["vocab_size"], options["shared_vocab"])
        for name, tokenizer in zip(TOKENIZER_FILES, tokenizers):
            (out / "tokenizers").mkdir(parents=True, exist_ok=True)
            tokenizer.save(out / "tokenizers" / name)
        write_record(out, COMMAND, options, pairs=fingerprint(pairs))
    else:
        write_record(out, COMMAND, options, pairs=pairs_key, resumed=[*record.get("resumed", []), changes])
    source_tok, target_tok = tokenizers
    ids = special_ids(source_tok, target_tok)
    config = Seq2SeqConfig(source_vocab_size=source_tok.vocab_size, target_vocab_size=target_tok.vocab_size,
                           shared_vocab=options["shared_vocab"], **ids,
                           **{name: options[name] for name in MODEL_FIELDS})
    train_config = TrainConfig(**{name: options[name] for name in TRAIN_FIELDS})
    lengths = (config.max_source_length, config.max_target_length)
    encoded = {}
    for split, split_pairs in pairs.items():
        encoded[split], skipped = encode_pairs(split_pairs, source_tok, target_tok, *lengths)
        if skipped:
            say(f"note: {skipped} of {len(split_pairs)} {split} pairs are longer than the model's maximum lengths "
                f"({lengths[0]} source, {lengths[1] - 1} target tokens) and are left out")
    dist = init_distributed(options["device"])
    if dist.enabled:
        raise ConfigError("seq2seq training runs in one process; start it without torchrun")
    torch.manual_seed(train_config.seed)
    model = Seq2Seq(config).to(dist.device)
    say(f"translator: {model.num_parameters() / 1e6:.2f}M parameters, {config.n_encoder_layers}+"
        f"{config.n_decoder_layers} layers, d_model {config.d_model}, vocabularies {config.source_vocab_size}/"
        f"{config.target_vocab_size}{' (shared)' if config.shared_vocab else ''}; pairs: "
        + ", ".join(f"{len(v):,} {k}" for k, v in encoded.items()))

    ids_for_batches = {k: ids[k] for k in ("source_pad_id", "pad_id", "bos_id", "eos_id")}
    batches = PairBatches(encoded["train"], train_config.batch_size, ids_for_batches, train_config.seed)
    val = fixed_batches(encoded["valid"], train_config.batch_size, ids_for_batches)[: train_config.eval_batches]
    translator = Translator(model, source_tok, target_tok)
    # Translation is scored on the pairs whose source fits the encoder (the others were left out above).
    fits = {split: [p for p in split_pairs if len(encode_source(source_tok, p[0])) <= config.max_source_length]
            for split, split_pairs in pairs.items()}
    bleu_pairs = fits["valid"][: options["bleu_pairs"]]
    last_scores: dict = {}

    def evaluate_fn(m: Seq2Seq, batches) -> dict:
        val_loss = evaluate(m, batches, train_config, dist)
        scores = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
        if bleu_pairs:
            scores.update({f"valid_{k}": v for k, v in translator.bleu(bleu_pairs).items()})
            m.train()
        last_scores.clear()
        last_scores.update(scores)
        return scores

    def sample() -> str:
        example = translator.translate(bleu_pairs[0][0])[0] if bleu_pairs else ""
        translator.model.train()
        if not bleu_pairs:
            return ""
        return (f"valid BLEU {last_scores['valid_bleu']:.1f}, exact {last_scores['valid_exact_match']:.1%} on "
                f"{len(bleu_pairs)} pairs; {bleu_pairs[0][0]!r} -> {example!r}")

    def save_model(directory: Path) -> None:
        save_translator(directory, model, source_tok, target_tok)

    def load_model(directory: Path) -> None:
        load_weights(model, directory)

    reporter = TrainingReport(out, progress=opts.progress, sample=sample, print_fn=say if say is not print else None)
    resume_from = out / "last" if opts.resume else None
    result = train(model, train_config, batches, val, out_dir=out, save_model=save_model, load_model=load_model,
                   resume_from=resume_from, dist=dist, reporter=reporter, evaluate_fn=evaluate_fn)
    model.eval()
    scores = {"step": result.step, "train_seconds": result.elapsed, "best_val_loss": result.best_val_loss,
              **{k: v for k, v in last_scores.items() if k.startswith("valid_")}}
    if fits.get("test"):
        for beam in sorted({1, options["beam_size"]}):
            for k, v in translator.bleu(fits["test"], beam_size=beam).items():
                scores[f"test_{k}_beam{beam}"] = v
        beam = options["beam_size"]
        say(f"test ({len(fits['test']):,} held-out pairs): BLEU {scores['test_bleu_beam1']:.2f} greedy, "
            f"{scores[f'test_bleu_beam{beam}']:.2f} with beam {beam}; exact match "
            f"{scores['test_exact_match_beam1']:.1%} greedy")
    atomic_write_json(out / "results.json", scores)
    say(f"done: {result.step} steps in {result.elapsed:.0f} s. Translator in {out / 'best'} and {out / 'last'}: "
        f"`scratchlm seq2seq translate {out} \"TEXT\"`; curves {out / 'loss.png'}, scores {out / 'results.json'}")
    return scores
