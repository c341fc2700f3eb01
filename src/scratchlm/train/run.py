"""``scratchlm train``: corpus -> tokenizer -> token binaries -> model -> training loop -> checkpoints.

    result = run_training(RunOptions(data="my_texts/", out="runs/mine", train={"max_steps": 5000}))
    result = run_training(RunOptions(out="runs/mine", resume=True))   # the same run, from its last checkpoint

Under ``torchrun`` every process runs this same function: rank 0 builds the tokenizer and the token
binaries (or, resuming, checks them) and writes ``run.json`` while the others wait, then all of them train
together (see distributed.py).

Files in ``out`` (default ``runs/<preset>``):

    run.json        every option of the run, resolved, with the fingerprints of its data (record.py)
    data/           train.bin, val.bin, data.json, tokenizer.json: reused by a new run while the inputs are
                    unchanged; never written by a resumed one
    last/  best/    checkpoints (see checkpoint.py); ``scratchlm generate out/best "..."`` reads them
    metrics.jsonl   one line per step and per evaluation
    loss.png        training and validation loss

Resuming restores the run from ``run.json``: its data, tokenizer, model, schedule and length. Options given
again must equal the recorded ones, except those in ``CHANGEABLE`` (``--max-steps`` extends a run).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import ConfigError, DataError, TrainingError, UnsupportedError
from scratchlm.files import atomic_write_json, read_json
from scratchlm.formats.checkpoint import CONFIG_FILE, save_model_dir
from scratchlm.model import Transformer
from scratchlm.tokenizer import Tokenizer
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.data import (
    PreparedData,
    RandomBatches,
    eval_batches,
    load_prepared,
    prepare_dataset,
    tokenizer_fingerprint,
)
from scratchlm.train.distributed import Dist, main_process_first, process_group
from scratchlm.train.loop import TrainConfig, TrainResult, train
from scratchlm.train.parallel.mesh import layout_record, parallel_config, resume_layout
from scratchlm.train.presets import PRESETS, Preset, get_preset
from scratchlm.train.record import RUN_FILE, describe_changes, merge_given, read_record, write_record
from scratchlm.train.report import TrainingReport, sample_text
from scratchlm.train.sources import bundled_corpus, fingerprint_sources, read_documents

BYTE_ALPHABET = 256  # a byte-level BPE starts from every byte value
DEFAULT_PRESET = "shakespeare-char"
# Options that may differ when a run is resumed: its length, how often it evaluates, what it prints, where and
# how fast it runs. Everything else (data, tokenizer, model shape, optimizer, batch, seed, dtype) would make it
# another run, so --resume refuses it (see record.py).
CHANGEABLE = ("max_steps", "eval_interval", "early_stopping", "sample_tokens", "prompt", "device", "compile",
              "activation_checkpointing")
MODEL_FIELDS = tuple(f.name for f in fields(ModelConfig) if f.name not in ("vocab_size", "name"))
TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig))


@dataclass
class RunOptions:
    """Everything ``scratchlm train`` can be told; None means "not given": the preset's value for a new run,
    the recorded value (``OUT/run.json``) for ``resume=True``."""

    data: str | Path | None = None  # text file, folder or JSONL; None: the bundled Shakespeare
    preset: str | None = None  # None: shakespeare-char
    out: str | Path | None = None  # None: runs/<preset>
    train: dict = field(default_factory=dict)  # TrainConfig fields to change
    model: dict = field(default_factory=dict)  # ModelConfig fields to change (context_length, dropout, ...)
    vocab_size: int | None = None  # BPE presets only
    tokenizer: str | Path | None = None  # an existing tokenizer.json instead of training one
    text_field: str | None = None  # None: "text"
    val_fraction: float | None = None  # None: 0.1
    resume: bool = False
    force: bool = False  # replace a previous run in ``out``
    device: str | None = None  # None: "auto"
    progress: bool = True
    sample_tokens: int | None = None  # 0: no samples
    prompt: str | None = None
    # FSDP, ZeRO-1, tensor or pipeline parallelism under torchrun (train.parallel.ParallelConfig); None: DDP. How
    # the run is laid out, not what it trains: run.json records it ("layout"), and a resume given no --parallel
    # flags under torchrun keeps the recorded mode; another layout is allowed and said (mesh.resume_layout).
    parallel: object | None = None
    dist_timeout: float | None = None  # seconds a collective waits for the other processes (None: 300)


def run_training(opts: RunOptions) -> TrainResult:
    """Train a model as ``opts`` says (or resume the run in ``opts.out``); returns the loop's result."""
    out = _out_dir(opts)
    device = opts.device
    if device is None and opts.resume:  # the device is needed before the record is merged
        device = ((read_record(out, "train") or {}).get("options") or {}).get("device")
    with process_group(device or "auto", opts.dist_timeout) as dist:  # peer failures: one-line errors
        return _run(opts, out, dist)


def _out_dir(opts: RunOptions) -> Path:
    return Path(opts.out) if opts.out is not None else Path("runs") / (opts.preset or DEFAULT_PRESET)


def resolve_options(opts: RunOptions, preset: Preset) -> dict:
    """Every option of a new run with its value: the one given, else the preset's, else the default.

    Flat: the top-level options, TrainConfig's fields and ModelConfig's (less vocab_size and name), whose
    names do not overlap. This is what ``run.json`` records.
    """
    for what, given, allowed in (("model", opts.model, MODEL_FIELDS), ("train", opts.train, TRAIN_FIELDS)):
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ConfigError(f"RunOptions.{what} has fields that it does not take: {unknown}; allowed: "
                              f"{', '.join(allowed)}" + (" (vocab_size follows from the tokenizer)" if what == "model"
                                                         else ""))
    train_config = replace(preset.train, **opts.train)  # validated by TrainConfig
    model = {**preset.model, **opts.model}
    data = Path(opts.data).expanduser() if opts.data is not None else bundled_corpus()
    return {
        "data": str(data.resolve()),
        "preset": preset.name,
        "tokenizer": str(Path(opts.tokenizer).expanduser().resolve()) if opts.tokenizer is not None else None,
        "vocab_size": opts.vocab_size if opts.vocab_size is not None else preset.vocab_size,
        "text_field": opts.text_field if opts.text_field is not None else "text",
        "val_fraction": opts.val_fraction if opts.val_fraction is not None else 0.1,
        "device": opts.device if opts.device is not None else "auto",
        "sample_tokens": preset.sample_tokens if opts.sample_tokens is None else opts.sample_tokens,
        "prompt": preset.sample_prompt if opts.prompt is None else opts.prompt,
        **train_config.to_dict(),
        **{name: model[name] for name in MODEL_FIELDS if name in model},
    }


def given_options(opts: RunOptions) -> dict:
    """The options given now, in ``resolve_options``'s flat form, None for those not given."""
    return {
        "data": str(Path(opts.data).expanduser().resolve()) if opts.data is not None else None,
        "preset": opts.preset,
        "tokenizer": str(Path(opts.tokenizer).expanduser().resolve()) if opts.tokenizer is not None else None,
        "vocab_size": opts.vocab_size, "text_field": opts.text_field, "val_fraction": opts.val_fraction,
        "device": opts.device, "sample_tokens": opts.sample_tokens, "prompt": opts.prompt,
        **opts.train, **opts.model,
    }


def _run(opts: RunOptions, out: Path, dist: Dist) -> TrainResult:
    say = print if dist.is_main else (lambda *a, **k: None)

    # Rank 0 settles the options and the data and writes run.json; the others then read both.
    resume_dir = None
    with main_process_first(dist, "training"):
        if dist.is_main:
            if opts.resume:
                resume_dir, tokenizer, prepared = _resume_run(out, opts, say, dist.world_size)
            else:
                tokenizer, prepared = _new_run(out, opts, say, dist.world_size)
    record = read_record(out, "train")
    options = record["options"]
    # The layout rank 0 settled (the flags, or on resume the recorded one): the same on every process.
    parallel = opts.parallel if "layout" not in record else parallel_config(record["layout"])
    if opts.resume:
        resume_dir = ckpt.resolve_checkpoint(out / "last")
    if not dist.is_main:
        tokenizer = load_tokenizer(out / "data")
        prepared = load_prepared(out / "data")
    preset = get_preset(options["preset"])
    config = TrainConfig(**{name: options[name] for name in TRAIN_FIELDS})

    model_fields = {**{name: options[name] for name in MODEL_FIELDS if name in options},
                    "vocab_size": tokenizer.vocab_size, "name": preset.name}
    model_config = ModelConfig(**model_fields)
    prepared.check_fits(model_config.context_length)
    plan = None
    if parallel is not None:
        from scratchlm.train.parallel import ParallelPlan

        plan = ParallelPlan(parallel, dist, model_config, config.batch_size)
        say(f"parallel: {parallel.mode}, mesh {plan.shape} over {dist.world_size} process(es)")
    torch.manual_seed(config.seed)  # the same initial weights on every process and every run
    model = Transformer(model_config).to(dist.device)
    say(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {model_config.n_layers} layers, d_model "
        f"{model_config.d_model}, context {model_config.context_length}, vocabulary {model_config.vocab_size}; "
        f"data: {prepared.meta['train_tokens']:,} training and {prepared.meta['val_tokens']:,} validation tokens")

    # Data-parallel replicas draw different rows; the ranks of one replica (tensor or pipeline) the same ones.
    replica, replicas = (plan.dp_rank, plan.dp_size) if plan is not None else (dist.rank, dist.world_size)
    batches = RandomBatches(prepared.train(), config.batch_size, model_config.context_length, config.seed,
                            replica, replicas)
    if plan is not None:
        val = plan.share_eval_batches(eval_batches(prepared.val(), config.batch_size, model_config.context_length,
                                                   config.eval_batches))
    else:
        val = eval_batches(prepared.val(), config.batch_size, model_config.context_length, config.eval_batches,
                           replica, replicas)
    reporter = None
    n_sample, prompt = options["sample_tokens"], options["prompt"]
    if plan is not None and plan.sharded and n_sample > 0:  # rank 0 alone cannot run a sharded forward
        say("samples are off under a sharded --parallel mode: generate from OUT/best after training")
        n_sample = 0
    if dist.is_main:
        sample = (lambda: sample_text(model, tokenizer, prompt, n_sample)) if n_sample > 0 else None
        reporter = TrainingReport(out, progress=opts.progress, sample=sample)

    def save_model(directory: Path) -> None:
        from scratchlm.train.parallel.dcp_checkpoint import model_weights  # from the shards of a sharded run

        save_model_dir(directory, model_config, model_weights(directory, model), tokenizer)

    result = train(model, config, batches, val, out_dir=out, save_model=save_model, resume_from=resume_dir,
                   dist=dist, reporter=reporter, parallel=plan)
    if dist.is_main and n_sample > 0:
        text = sample_text(model, tokenizer, prompt, 2 * n_sample, seed=config.seed)
        say(f"\nA sample from the trained model (step {result.step}, prompt {prompt!r}):\n{prompt}{text}\n")
    if result.best_val_loss is not None:
        say(f"done: {result.step} steps in {result.elapsed:.0f} s; best validation loss {result.best_val_loss:.4f}"
            f"{' (stopped early)' if result.stopped_early else ''}")
    say(f"wrote {out}: checkpoints {out / 'best'} (lowest validation loss) and {out / 'last'} (continue with "
        f"`scratchlm train --out {out} --resume`), curves {out / 'loss.png'} and {out / 'metrics.jsonl'}, "
        f"options {out / RUN_FILE}, token files {out / 'data'}")
    return result


def _new_run(out: Path, opts: RunOptions, say, world_size: int = 1) -> tuple[Tokenizer, PreparedData]:
    """Rank 0's start of a new run: clear ``out``, build the tokenizer and token files, record the options and the
    layout."""
    preset = get_preset(opts.preset or DEFAULT_PRESET)
    options = resolve_options(opts, preset)  # validates the values before anything is deleted
    clear_out_dir(out, opts.force, "training")
    data_path = Path(options["data"])
    if opts.tokenizer is not None:
        tokenizer = load_tokenizer(Path(opts.tokenizer))
    else:
        tokenizer = build_tokenizer(preset, data_path, opts, out / "data", say)
    prepared = prepare_dataset(data_path, tokenizer, out / "data", options["val_fraction"], options["text_field"],
                               progress=opts.progress)
    tokenizer.save(out / "data" / "tokenizer.json")
    atomic_write_json(out / "data" / "tokenizer_config.json", {"eos_token": tokenizer.eos_token})
    write_record(out, "train", options, prepared=_data_summary(prepared), tokenizer=tokenizer_fingerprint(tokenizer),
                 layout=layout_record(opts.parallel, world_size))
    return tokenizer, prepared


def _data_summary(prepared: PreparedData) -> dict:
    """What identifies the token files: data.json's key, the sources and the byte size of each binary."""
    return {"key": prepared.meta["key"], "sources": prepared.meta["sources"],
            "bytes": {s: (prepared.directory / f"{s}.bin").stat().st_size for s in ("train", "val")}}


def _resume_run(out: Path, opts: RunOptions, say, world_size: int = 1) -> tuple[Path, Tokenizer, PreparedData]:
    """Rank 0's start of a resumed run: merge the given options into the recorded ones, choose the layout, check
    the token files, update run.json. Nothing in ``out/data`` is written."""
    resume_dir = ckpt.resolve_checkpoint(out / "last")
    if resume_dir is None:
        raise TrainingError(f"no checkpoint to resume from in {out / 'last'}: start the run without --resume "
                            f"(a run writes its first checkpoint at its first evaluation)")
    state = ckpt.read_trainer_state(resume_dir)
    record = read_record(out, "train") or _legacy_record(out, resume_dir, state, opts)
    recorded = record["options"]
    options = merge_given(out, "train", recorded, given_options(opts), CHANGEABLE)
    get_preset(options["preset"])
    changes = describe_changes(recorded, options)
    say(f"resuming {out} from {resume_dir} at step {state['step']} of {options['max_steps']} "
        f"(data {options['data']}, preset {options['preset']})" + (f"; changed: {changes}" if changes else ""))

    if state["step"] >= options["max_steps"]:
        say(f"the run is complete (step {state['step']} of {options['max_steps']}): nothing to train; add "
            f"--max-steps N (more than {state['step']}) to train it longer")
    tokenizer = load_tokenizer(resume_dir)
    prepared = load_prepared(out / "data")
    _check_prepared(out, prepared, record.get("prepared"))
    _warn_if_sources_changed(prepared, say)
    if record.get("tokenizer") is not None and tokenizer_fingerprint(tokenizer) != record["tokenizer"]:
        raise TrainingError(f"the tokenizer in {resume_dir} is not the one this run started with; the checkpoint "
                            f"does not belong to {out / RUN_FILE}: start a new run (--force or another --out)")
    layout = layout_record(resume_layout(record.get("layout"), opts.parallel, world_size, say), world_size)
    resumed = [*record.get("resumed", []), {"step": state["step"], "changed": changes, "layout": layout}]
    extra = {k: v for k, v in record.items() if k not in ("version", "command", "options", "resumed", "layout")}
    write_record(out, "train", options, **extra, resumed=resumed, layout=layout)
    return resume_dir, tokenizer, prepared


def _legacy_record(out: Path, resume_dir: Path, state: dict, opts: RunOptions) -> dict:
    """A record for a run written before run.json existed: the checkpoint knows the training and model
    configuration; the data options can only be the ones given (the token files in ``out/data`` are used)."""
    model_config = read_json(resume_dir / CONFIG_FILE)
    preset_name = model_config.get("name") if model_config.get("name") in PRESETS else DEFAULT_PRESET
    base = resolve_options(replace(opts, preset=opts.preset or preset_name), get_preset(opts.preset or preset_name))
    options = {**base, **state["train_config"], **{k: model_config[k] for k in MODEL_FIELDS if k in model_config}}
    sources = [row["path"] for row in load_prepared(out / "data").meta.get("sources", [])]
    if opts.data is None and sources:  # what the token files were made from: a file, or the folder holding them
        options["data"] = sources[0] if len(sources) == 1 else os.path.commonpath(sources)
    print(f"note: {out} has no {RUN_FILE} (an older run): its training and model options come from "
          f"{resume_dir}; it goes on with the token files in {out / 'data'}")
    return {"options": options}


def _check_prepared(out: Path, prepared: PreparedData, recorded: dict | None) -> None:
    """Refuse to resume on token files that are not the ones the run started with."""
    directory = prepared.directory
    for split in ("train", "val"):
        path = directory / f"{split}.bin"
        expected = prepared.meta[f"{split}_tokens"] * prepared.dtype.itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected or (recorded and recorded["bytes"][split] != size):
            raise TrainingError(f"{path} is missing or changed since the run started ({size} bytes, expected "
                                f"{expected}): the run cannot continue on the same data; start a new run with "
                                "--force (it tokenizes the data again) or use another --out")
    if recorded and prepared.meta.get("key") != recorded["key"]:
        raise TrainingError(f"{directory / 'data.json'} describes other token files than the run started with: the "
                            "run cannot continue on the same data; start a new run with --force or another --out")


def _warn_if_sources_changed(prepared: PreparedData, say) -> None:
    """The run goes on with its token files; say so when the text they were made from has changed since."""
    changed = []
    for row in prepared.meta.get("sources", []):
        path = Path(row["path"])
        if not path.is_file():
            changed.append(f"{path} (missing)")
        elif path.stat().st_size != row["size"] or fingerprint_sources(path)[0]["sha256"] != row["sha256"]:
            changed.append(f"{path} (edited)")
    if changed:
        say(f"warning: the training text changed since this run started: {', '.join(changed[:3])}"
            f"{f' and {len(changed) - 3} more' if len(changed) > 3 else ''}. The resumed run continues on the "
            f"token files made at its start ({prepared.directory}), unchanged; to train on the new text, start a "
            "new run (--force, or another --out)")


def clear_out_dir(out: Path, force: bool, what: str) -> None:
    """Empty a run directory of checkpoints, metrics, plot and record for a new run (``what``: "training",
    ...); refuses when it holds a checkpoint and ``force`` is not set."""
    existing = ckpt.resolve_checkpoint(out / "last")
    if existing is not None and not force:
        step = ckpt.read_trainer_state(existing).get("step")
        command = "train" if what == "training" else "finetune"
        raise TrainingError(f"{out} already holds a {what} run (checkpoint at step {step}): continue it with "
                            f"`scratchlm {command} --out {out} --resume`, replace it by adding --force, or keep it "
                            f"and write the new run elsewhere with --out ANOTHER_DIR")
    for name in ("last", "best", ".last.old", ".best.old"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "loss.png", RUN_FILE):
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
    text_field = opts.text_field if opts.text_field is not None else "text"
    key_spec = {"sources": fingerprint_sources(data_path), "kind": preset.tokenizer, "vocab_size": vocab_size,
                "specials": list(preset.special_tokens), "eos": preset.eos_token, "text_field": text_field}
    key = hashlib.sha256(json.dumps(key_spec, sort_keys=True).encode()).hexdigest()
    key_file = cache / "tokenizer.key"
    if key_file.is_file() and key_file.read_text().strip() == key and (cache / "tokenizer.json").is_file():
        return load_tokenizer(cache)

    texts = [text for _, text in read_documents(data_path, text_field)]
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
