"""``scratchlm train``: corpus -> tokenizer -> token binaries -> model -> training loop -> checkpoints.

    result = run_training(RunOptions(preset="shakespeare-char", out="runs/shakespeare-char"))

Under ``torchrun`` every process runs this same function: rank 0 builds the tokenizer and the token
binaries while the others wait, then all of them train together (see distributed.py).

Files in ``out`` (default ``runs/<preset>``):

    data/           train.bin, val.bin, data.json, tokenizer.json: reused while the inputs are unchanged
    last/  best/    checkpoints (see checkpoint.py); ``scratchlm generate out/best "..."`` reads them
    metrics.jsonl   one line per step and per evaluation
    loss.png        training and validation loss
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import ConfigError, DataError, TrainingError, UnsupportedError
from scratchlm.files import atomic_write_json
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.model import Transformer
from scratchlm.tokenizer import Tokenizer
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.data import RandomBatches, eval_batches, load_prepared, prepare_dataset
from scratchlm.train.distributed import Dist, barrier, init_distributed, shutdown
from scratchlm.train.loop import TrainResult, train
from scratchlm.train.presets import Preset, get_preset
from scratchlm.train.report import TrainingReport, sample_text
from scratchlm.train.sources import bundled_corpus, fingerprint_sources, read_documents

BYTE_ALPHABET = 256  # a byte-level BPE starts from every byte value


@dataclass
class RunOptions:
    """Everything ``scratchlm train`` can be told; None means "the preset's value"."""

    data: str | Path | None = None  # text file, folder or JSONL; None: the bundled Shakespeare
    preset: str = "shakespeare-char"
    out: str | Path | None = None  # None: runs/<preset>
    train: dict = field(default_factory=dict)  # TrainConfig fields to change
    model: dict = field(default_factory=dict)  # ModelConfig fields to change (context_length, dropout, ...)
    vocab_size: int | None = None  # BPE presets only
    tokenizer: str | Path | None = None  # an existing tokenizer.json instead of training one
    text_field: str = "text"
    val_fraction: float = 0.1
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    progress: bool = True
    sample_tokens: int | None = None  # 0: no samples
    prompt: str | None = None


def run_training(opts: RunOptions) -> TrainResult:
    """Train a model as ``opts`` says; returns the loop's result (on every process)."""
    preset = get_preset(opts.preset)
    dist = init_distributed(opts.device)
    try:
        return _run(opts, preset, dist)
    finally:
        shutdown(dist)


def _run(opts: RunOptions, preset: Preset, dist: Dist) -> TrainResult:
    data_path = Path(opts.data) if opts.data is not None else bundled_corpus()
    out = Path(opts.out) if opts.out is not None else Path("runs") / preset.name
    config = replace(preset.train, **opts.train)  # validated again by TrainConfig
    say = print if dist.is_main else (lambda *a, **k: None)

    resume_dir = _check_out_dir(out, opts, dist) if dist.is_main else None
    barrier(dist)
    if opts.resume:
        resume_dir = ckpt.resolve_checkpoint(out / "last")
        if resume_dir is None:
            raise TrainingError(f"no checkpoint to resume from in {out / 'last'}: train without --resume first")
        say(f"resuming from {resume_dir} at step {ckpt.read_trainer_state(resume_dir)['step']}")

    # Tokenizer and token binaries: built once by rank 0, read by everyone.
    if dist.is_main:
        if resume_dir is not None:
            tokenizer = load_tokenizer(resume_dir)
        elif opts.tokenizer is not None:
            tokenizer = load_tokenizer(Path(opts.tokenizer))
        else:
            tokenizer = build_tokenizer(preset, data_path, opts, out / "data", say)
        prepared = prepare_dataset(data_path, tokenizer, out / "data", opts.val_fraction, opts.text_field,
                                   progress=opts.progress)
        tokenizer.save(out / "data" / "tokenizer.json")
        atomic_write_json(out / "data" / "tokenizer_config.json", {"eos_token": tokenizer.eos_token})
    barrier(dist)
    if not dist.is_main:
        tokenizer = load_tokenizer(out / "data")
        prepared = load_prepared(out / "data")

    model_fields = {**preset.model, **opts.model, "vocab_size": tokenizer.vocab_size, "name": preset.name}
    model_config = ModelConfig(**model_fields)
    prepared.check_fits(model_config.context_length)
    torch.manual_seed(config.seed)  # the same initial weights on every process and every run
    model = Transformer(model_config).to(dist.device)
    say(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {model_config.n_layers} layers, d_model "
        f"{model_config.d_model}, context {model_config.context_length}, vocabulary {model_config.vocab_size}; "
        f"data: {prepared.meta['train_tokens']:,} training and {prepared.meta['val_tokens']:,} validation tokens")

    batches = RandomBatches(prepared.train(), config.batch_size, model_config.context_length, config.seed,
                            dist.rank, dist.world_size)
    val = eval_batches(prepared.val(), config.batch_size, model_config.context_length, config.eval_batches,
                       dist.rank, dist.world_size)
    reporter = None
    n_sample = preset.sample_tokens if opts.sample_tokens is None else opts.sample_tokens
    prompt = preset.sample_prompt if opts.prompt is None else opts.prompt
    if dist.is_main:
        sample = (lambda: sample_text(model, tokenizer, prompt, n_sample)) if n_sample > 0 else None
        reporter = TrainingReport(out, progress=opts.progress, sample=sample)

    def save_model(directory: Path) -> None:
        save_model_dir(directory, model.config, model.canonical_state_dict(), tokenizer)

    start = time.perf_counter()
    result = train(model, config, batches, val, out_dir=out, save_model=save_model, resume_from=resume_dir,
                   dist=dist, reporter=reporter)
    elapsed = time.perf_counter() - start
    if dist.is_main and n_sample > 0:
        text = sample_text(model, tokenizer, prompt, 2 * n_sample, seed=config.seed)
        say(f"\nA sample from the trained model (step {result.step}, prompt {prompt!r}):\n{prompt}{text}\n")
    if result.best_val_loss is not None:
        say(f"done: {result.step} steps in {elapsed:.0f} s; best validation loss {result.best_val_loss:.4f}"
            f"{' (stopped early)' if result.stopped_early else ''}")
    say(f"checkpoints: {out / 'best'} (lowest validation loss), {out / 'last'} (resume with --resume); "
        f"curves: {out / 'loss.png'}, {out / 'metrics.jsonl'}")
    return result


def _check_out_dir(out: Path, opts: RunOptions, dist: Dist) -> Path | None:
    """Refuse to overwrite a run by accident; clear it with --overwrite. Returns the checkpoint to resume."""
    if opts.resume:
        return ckpt.resolve_checkpoint(out / "last")
    clear_out_dir(out, opts.overwrite, "training")
    return None


def clear_out_dir(out: Path, overwrite: bool, what: str) -> None:
    """Empty a run directory of checkpoints, metrics and plot for a new run (``what``: "training", ...);
    refuses when it holds a checkpoint and ``overwrite`` is not set."""
    existing = ckpt.resolve_checkpoint(out / "last")
    if existing is not None and not overwrite:
        step = ckpt.read_trainer_state(existing).get("step")
        raise TrainingError(f"{out} already holds a {what} run (checkpoint at step {step}): pass --resume to "
                            "continue it, --overwrite to start again, or choose another --out")
    for name in ("last", "best", ".last.old", ".best.old"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "loss.png"):
        (out / name).unlink(missing_ok=True)


def load_tokenizer(path: Path) -> Tokenizer:
    """A tokenizer.json (or a directory holding one, with tokenizer_config.json naming the EOS token)."""
    directory = path if path.is_dir() else path.parent
    file = path / "tokenizer.json" if path.is_dir() else path
    tokenizer = Tokenizer.from_file(file)
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        eos = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos is not None and tokenizer.token_to_id(eos) is not None:
            tokenizer.eos_token = eos
    return tokenizer


def build_tokenizer(preset: Preset, data_path: Path, opts: RunOptions, cache: Path, say=print) -> Tokenizer:
    """Train the preset's tokenizer on the corpus, or reuse the one trained on the same inputs before."""
    vocab_size = opts.vocab_size or preset.vocab_size
    if preset.tokenizer == "bpe":
        smallest = BYTE_ALPHABET + len(preset.special_tokens)
        if vocab_size is None or vocab_size < smallest:
            raise ConfigError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs the 256 bytes plus "
                              f"{len(preset.special_tokens)} special token(s), so at least {smallest}")
    elif opts.vocab_size is not None:
        raise ConfigError(f"--vocab-size applies to BPE presets; {preset.name} is character-level "
                          "(its vocabulary is the corpus's characters)")
    key_spec = {"sources": fingerprint_sources(data_path), "kind": preset.tokenizer, "vocab_size": vocab_size,
                "specials": list(preset.special_tokens), "eos": preset.eos_token, "text_field": opts.text_field}
    key = hashlib.sha256(json.dumps(key_spec, sort_keys=True).encode()).hexdigest()
    key_file = cache / "tokenizer.key"
    if key_file.is_file() and key_file.read_text().strip() == key and (cache / "tokenizer.json").is_file():
        return load_tokenizer(cache)

    texts = [text for _, text in read_documents(data_path, opts.text_field)]
    if not any(texts):
        raise DataError(f"training data {data_path} is empty: give a corpus with some text")
    if preset.tokenizer == "char":
        from scratchlm.train.chars import train_char_tokenizer

        tokenizer = train_char_tokenizer(texts, preset.special_tokens, preset.eos_token)
    else:
        try:
            from scratchlm.train.bpe import train_bpe
        except ImportError:
            raise UnsupportedError("the BPE trainer (scratchlm.train.bpe) is not available in this install; "
                                   "use --preset shakespeare-char") from None
        say(f"training a byte-level BPE tokenizer ({vocab_size} tokens) on {data_path} ...")
        start = time.perf_counter()
        tokenizer = train_bpe(texts, vocab_size, list(preset.special_tokens))
        tokenizer.eos_token = preset.eos_token
        say(f"tokenizer trained in {time.perf_counter() - start:.1f} s")
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer.save(cache / "tokenizer.json")
    atomic_write_json(cache / "tokenizer_config.json", {"eos_token": tokenizer.eos_token})
    key_file.write_text(key + "\n")
    return tokenizer
