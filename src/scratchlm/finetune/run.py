"""``scratchlm finetune``: a pretrained model + chat JSONL -> an adapter (LoRA, QLoRA) or new weights (full).

    result = run_finetune(FinetuneOptions(model="smollm2-135m-instruct", data="task/train.jsonl",
                                          out="runs/task", method="lora", epochs=1))

The training itself is the pre-training loop (``train.loop.train``): same progress bar, ``metrics.jsonl``,
``loss.png``, ``best/`` and ``last/`` checkpoints and exact ``--resume``. Fine-tuning gives it

* batches whose targets are -100 outside the assistant's tokens (``finetune.data``),
* which parameters train: the LoRA matrices, or everything (full),
* how to write and read the model part of a checkpoint: a PEFT adapter for LoRA/QLoRA, so ``last/``
  and ``best/`` are adapters that PEFT and ``--adapter`` read, or a model directory for full.

Files in ``out``: ``best/`` and ``last/`` (checkpoints), ``metrics.jsonl``, ``loss.png``, ``run.json`` (every
option, resolved, and the SHA-256 of the data files). ``--resume`` needs only ``--out``: it restores the
recorded options; of those given again only ``CHANGEABLE`` may differ, and the data files must be unchanged
(fine-tuning reads them again; pre-training, which keeps token files, only warns).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from scratchlm.errors import ConfigError, TrainingError
from scratchlm.files import read_json
from scratchlm.finetune.data import IGNORE, fixed_batches, load_examples, read_jsonl, split_examples, to_messages
from scratchlm.finetune.lora import DEFAULT_TARGETS, LoraSettings, apply_lora, lora_parameter_names, parse_targets
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.distributed import Dist, main_process_first
from scratchlm.train.loop import TrainConfig, TrainResult, lm_loss, train
from scratchlm.train.parallel.dcp_checkpoint import model_weights
from scratchlm.train.parallel.mesh import ParallelConfig, layout_record, resume_layout
from scratchlm.train.record import RUN_FILE, describe_changes, merge_given, read_record, write_record
from scratchlm.train.run import clear_out_dir
from scratchlm.train.sources import fingerprint_sources

METHODS = ("lora", "qlora", "full")
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}
# The value of each option left out (None) in a new run. lr, warmup_steps, eval_interval, max_length and the
# number of steps depend on the method, the model and the data, and are settled once those are loaded.
DEFAULTS = dict(method="lora", rank=8, alpha=16.0, dropout=0.0, targets=DEFAULT_TARGETS, batch_size=8,
                grad_accum_steps=1, weight_decay=0.0, too_long="truncate", val_fraction=0.1, dtype="float32",
                activation_checkpointing=False, seed=0, task="lm", labels=None, optimizer="adamw", momentum=0.9,
                freeze_layers=0, unfreeze_every=None, layer_lr_decay=1.0)
# Options that may differ when a run is resumed (see train/record.py): how long it trains, how often it evaluates.
CHANGEABLE = ("max_steps", "epochs", "eval_interval")


@dataclass
class FinetuneOptions:
    """Everything ``scratchlm finetune`` can be told. None means "not given": ``DEFAULTS`` (or a value that
    follows from the method, model and data) for a new run, the recorded value (``OUT/run.json``) for
    ``resume=True``, which needs only ``out``."""

    model: str | None = None  # a known name, a .gguf file or a model directory
    data: str | Path | None = None  # chat JSONL
    out: str | Path | None = None
    method: str | None = None  # lora (default), qlora or full
    rank: int | None = None  # 8
    alpha: float | None = None  # 16
    dropout: float | None = None  # 0, PEFT's default
    targets: str | tuple[str, ...] | None = None  # all of q,k,v,o,gate,up,down
    epochs: float | None = None  # None and no max_steps: 1 epoch
    max_steps: int | None = None
    batch_size: int | None = None  # 8
    grad_accum_steps: int | None = None  # 1
    lr: float | None = None  # 2e-4 for LoRA/QLoRA, 2e-5 for full
    warmup_steps: int | None = None  # 5% of the steps
    weight_decay: float | None = None  # 0
    max_length: int | None = None  # the model's context, at most 1024
    too_long: str | None = None  # "truncate" or "skip"
    val_data: str | Path | None = None
    val_fraction: float | None = None  # 0.1
    eval_interval: int | None = None  # 5 evaluations per run
    dtype: str | None = None  # "float32" or "bfloat16"
    activation_checkpointing: bool | None = None
    seed: int | None = None  # 0
    task: str | None = None  # "lm" (default: chat data, the assistant's tokens) or "classify" (finetune/classify.py)
    labels: str | list[str] | None = None  # classify: the class names, "a,b,c"
    optimizer: str | None = None  # adamw (default), sgd, rmsprop, adafactor (train/optim.py)
    momentum: float | None = None  # SGD's and RMSprop's, 0.9
    freeze_layers: int | None = None  # the first N blocks and the embeddings stay frozen (finetune/freeze.py)
    unfreeze_every: int | None = None  # gradual unfreezing: one more block from the top every K steps
    layer_lr_decay: float | None = None  # discriminative rates: each layer group x this below the one above
    qat: str | None = None  # "int4": quantization-aware training (quant/qat.py)
    group_size: int | str | None = None  # QAT's int4 group: 32 (default), 64, 128 or "channel"
    resume: bool = False
    force: bool = False  # replace a previous run in ``out``
    progress: bool = True
    # Under torchrun: the layout (train.parallel.ParallelConfig; None: DDP, or on --resume the recorded one) and how
    # long a collective waits for the others (finetune/parallel.py). Recorded in run.json as "layout", not options.
    parallel: object | None = None
    dist_timeout: float | None = None


OPTION_NAMES = tuple(f.name for f in fields(FinetuneOptions)
                     if f.name not in ("out", "resume", "force", "progress", "parallel", "dist_timeout"))


def given_options(opts, names: tuple[str, ...] = OPTION_NAMES) -> dict:
    """The options ``names`` of ``opts`` (None: not given) in the form run.json records: paths absolute, targets
    short names (``align`` passes its own names)."""
    given = {name: getattr(opts, name) for name in names}
    for name in ("data", "val_data"):
        if given[name] is not None:
            given[name] = str(Path(given[name]).expanduser().resolve())
    if given["model"] is not None and Path(given["model"]).expanduser().exists():
        given["model"] = str(Path(given["model"]).expanduser().resolve())
    if given["targets"] is not None:
        given["targets"] = list(parse_targets(given["targets"]))
    return given


def _data_fingerprints(options: dict) -> dict:
    return {name: fingerprint_sources(options[name])[0]["sha256"] for name in ("data", "val_data")
            if options[name] is not None}


def run_finetune(opts: FinetuneOptions, say=print) -> TrainResult:
    """Fine-tune as ``opts`` says (or resume the run in ``opts.out``); returns the loop's result.
    Checkpoints, curves and ``run.json`` go to ``opts.out``. Under torchrun every process calls it (rank 0 prints
    and writes the files; finetune/parallel.py)."""
    from scratchlm.finetune.parallel import finetune_processes

    with finetune_processes(opts.dist_timeout) as dist:
        return _finetune(opts, dist, say if dist.is_main else _quiet)


def _quiet(*args, **kwargs) -> None:
    pass


def _finetune(opts: FinetuneOptions, dist: Dist, say) -> TrainResult:
    from scratchlm.llm import LLM

    if opts.out is None:
        raise ConfigError("give --out, the directory for the run's checkpoints and curves")
    out = Path(opts.out)
    given = given_options(opts)
    if given["epochs"] is not None and given["max_steps"] is not None:
        raise ConfigError("give --epochs or --max-steps, not both")
    if opts.resume:
        resume_dir, o = _resume_options(out, given, say)
    else:
        if given["model"] is None or given["data"] is None:
            raise ConfigError("give the base model and --data (only --resume takes them from the run's run.json)")
        o = {**given, **{k: v for k, v in DEFAULTS.items() if given[k] is None}}
        o["targets"] = list(parse_targets(o["targets"]))
        resume_dir = None
    if o["method"] not in METHODS:
        raise ConfigError(f"unknown method {o['method']!r}; choose one of {', '.join(METHODS)}")
    if o["epochs"] is not None and o["epochs"] <= 0:
        raise ConfigError(f"--epochs must be positive, got {o['epochs']}")
    if o["method"] != "full":
        LoraSettings(o["rank"], o["alpha"], o["dropout"])
    parallel = opts.parallel
    if opts.resume:  # the recorded layout when no --parallel flag is given; a change is said
        parallel = resume_layout((read_record(out, "finetune") or {}).get("layout"), parallel, dist.world_size, say)
    if dist.enabled or parallel is not None:
        from scratchlm.finetune.parallel import check_parallel

        check_parallel(o, (parallel or ParallelConfig()).mode)
        (parallel or ParallelConfig()).shape(dist.world_size)  # a world size that does not factor: say it now
    if o.get("task") == "classify":  # {"text", "label"} data and a classification head
        from scratchlm.finetune.classify import run_classify

        if not opts.resume:
            clear_out_dir(out, opts.force, "fine-tuning")
            out.mkdir(parents=True, exist_ok=True)
        return run_classify(o, out, resume_dir, opts.progress, say)
    if o.get("task") not in (None, "lm"):
        raise ConfigError(f"unknown task {o['task']!r}; choose lm or classify")
    _check_qat(o)
    for path in (o["data"], o["val_data"]):
        if path is not None:  # malformed lines, unknown roles, missing assistant turns: before loading
            for number, record in read_jsonl(path):
                to_messages(record, f"{path}, line {number}")
    with main_process_first(dist, "fine-tuning"):  # every process has read run.json by now; rank 0 may write
        if not opts.resume and dist.is_main:
            clear_out_dir(out, opts.force, "fine-tuning")
            out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    llm = LLM.load(o["model"], dequantize=True, compile=False)  # training needs the float weights
    model, tokenizer, template = llm.model, llm.tokenizer, llm.template
    say(f"loaded {llm.name} in {time.perf_counter() - start:.1f} s: {model.num_parameters() / 1e6:.1f}M parameters")

    # Data: render, tokenize, split.
    max_length = o["max_length"] or min(model.config.context_length, 1024)
    if max_length > model.config.context_length + 1:
        raise ConfigError(f"--max-length {max_length} exceeds the model's context of {model.config.context_length}")
    examples, stats = load_examples(o["data"], template, tokenizer, max_length, o["too_long"])
    say(f"data {o['data']}: {stats.describe(max_length)}")
    if o["val_data"] is not None:
        train_examples = examples
        val_examples, val_stats = load_examples(o["val_data"], template, tokenizer, max_length, o["too_long"])
        say(f"validation {o['val_data']}: {val_stats.describe(max_length)}")
    else:
        train_examples, val_examples = split_examples(examples, o["val_fraction"], o["seed"])
    say(f"{len(train_examples)} training and {len(val_examples)} validation examples")

    # Method: which weights train, and what a checkpoint holds.
    settings = None
    fingerprint = None
    n_base = model.num_parameters()
    if o["method"] == "full":
        trainable = None
        model.requires_grad_(True)
    else:
        from scratchlm.finetune.peft import base_fingerprint, check_peft_layout

        check_peft_layout(model.config)
        settings = LoraSettings(o["rank"], o["alpha"], o["dropout"], parse_targets(o["targets"], model.config.mlp))
        fingerprint = base_fingerprint(model)
        if o["method"] == "qlora":
            from scratchlm.finetune.nf4 import quantize_base

            quantize_base(model)
        apply_lora(model, settings, seed=o["seed"])
        trainable = lora_parameter_names(model)
    from scratchlm.finetune.freeze import TransferControls

    controls = TransferControls(model.config.n_layers, o.get("freeze_layers") or 0, o.get("unfreeze_every"),
                                o.get("layer_lr_decay") or 1.0)
    if controls.active:
        trainable = controls.trainable(trainable or [n for n, p in model.named_parameters() if p.requires_grad])
        say(f"transfer learning: {controls.describe()}")
    if o.get("qat") is not None:
        from scratchlm.quant.qat import prepare_qat

        prepare_qat(model, o["qat"], o.get("group_size") or QAT_GROUP_SIZE)
        say(f"quantization-aware training: the forward uses {o['qat']} weights (group "
            f"{o.get('group_size') or QAT_GROUP_SIZE}), as `scratchlm quantize --to {o['qat']}` will make them")
    _describe_memory(model, n_base, say)
    model.to(dist.device)

    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    from scratchlm.finetune.data import SFTBatches

    batches = SFTBatches(train_examples, o["batch_size"], pad_id, o["seed"])
    val = fixed_batches(val_examples, o["batch_size"], pad_id) if val_examples else None
    config = _train_config(o, batches.batches_per_epoch)
    plan, loss_fn, share = None, sft_loss, batches
    if dist.enabled or parallel is not None:  # every process draws the global batches and keeps its rows
        from scratchlm.finetune.parallel import ReplicaShare
        from scratchlm.train.parallel import ParallelPlan

        plan = ParallelPlan(parallel or ParallelConfig(), dist, model.config, o["batch_size"])
        say(f"parallel: {plan.mode}, mesh {plan.shape} over {dist.world_size} process(es)")
        share = ReplicaShare(batches, plan.dp_rank, plan.dp_size)
        loss_fn = share.weighted(sft_loss)
        val = plan.share_eval_batches(val) if val is not None else None
    say(f"{o['method']}: {config.max_steps} steps of {o['batch_size']} x {config.grad_accum_steps} examples "
        f"({config.max_steps * config.grad_accum_steps / batches.batches_per_epoch:.2f} epochs), lr {config.lr:g}")
    # Record the run with every value settled, so that --resume continues this very schedule.
    o.update(max_steps=config.max_steps, lr=config.lr, warmup_steps=config.warmup_steps,
             eval_interval=config.eval_interval, max_length=max_length)
    if dist.is_main:
        write_record(out, "finetune", o, data_sha256=_data_fingerprints(o),
                     layout=layout_record(parallel, dist.world_size))

    base_name = _base_name(o["model"])

    def save_model(directory: Path) -> None:
        if settings is None:  # a sharded run's weights come from the shards in directory/distcp
            save_model_dir(directory, model.config, model_weights(directory, model), tokenizer, template.source)
        else:
            from scratchlm.finetune.peft import save_adapter

            save_adapter(directory, model, settings, base_name, fingerprint)

    def load_model(directory: Path) -> None:
        from scratchlm.finetune.peft import load_adapter

        load_adapter(model, directory, merge=False, check_base=False)

    from scratchlm.train.report import TrainingReport

    reporter = TrainingReport(out, progress=opts.progress, print_fn=None) if dist.is_main else None
    result = train(model, config, share, val, trainable=trainable, out_dir=out, save_model=save_model,
                   resume_from=resume_dir, reporter=reporter, dist=dist, parallel=plan,
                   load_model=load_model if settings is not None else None, loss_fn=loss_fn,
                   lr_scale=controls.lr_scale if controls.layer_lr_decay != 1.0 else None,
                   before_step=controls.before_step(model, trainable) if trainable is not None else None)
    best = f"; best validation loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
    say(f"done: {result.step} steps in {result.elapsed:.0f} s{best}")
    final = out / ("best" if val is not None else "last")
    if settings is not None:
        say(f"wrote {out}: adapter (PEFT format) {final}{' (lowest validation loss)' if val is not None else ''}; "
            f"{out / 'last'} continues with `scratchlm finetune --out {out} --resume`; curves {out / 'loss.png'}, "
            f"{out / 'metrics.jsonl'}; options {out / RUN_FILE}\n"
            f"use it: scratchlm chat {o['model']} --adapter {final}   |   "
            f"scratchlm merge {o['model']} {final} --out merged")
    else:
        say(f"wrote {out}: model {final}{' (lowest validation loss)' if val is not None else ''}; {out / 'last'} "
            f"continues with `scratchlm finetune --out {out} --resume`; curves {out / 'loss.png'}, "
            f"{out / 'metrics.jsonl'}; options {out / RUN_FILE}\nuse it: scratchlm chat {final}")
    return result


QAT_GROUP_SIZE = 32  # quantize_model's default group


def _check_qat(o: dict) -> None:
    """--qat and --group-size make sense together, with LoRA (no dropout) or full fine-tuning."""
    if o.get("qat") is None:
        if o.get("group_size") is not None:
            raise ConfigError("--group-size applies to quantization-aware training: add --qat int4")
        return
    from scratchlm.quant.int4 import check_group_size
    from scratchlm.quant.qat import MODES

    if o["qat"] not in MODES:
        raise ConfigError(f"unknown --qat {o['qat']!r}; choose one of {', '.join(MODES)}")
    if o["method"] == "qlora":
        raise ConfigError("--qat trains through int4 weights itself: use it with --method lora or full, not qlora")
    if o["method"] == "lora" and o["dropout"]:
        raise ConfigError("--qat quantizes the merged LoRA weight, which leaves no place for LoRA dropout: "
                          "use --dropout 0")
    check_group_size(o.get("group_size") or QAT_GROUP_SIZE)


def _resume_options(out: Path, given: dict, say) -> tuple[Path, dict]:
    """The checkpoint to resume from and the recorded options merged with the given ones (see record.py)."""
    existing = ckpt.resolve_checkpoint(out / "last")
    if existing is None:
        raise TrainingError(f"no checkpoint to resume from in {out / 'last'}: fine-tune without --resume first")
    record = read_record(out, "finetune") or _legacy_record(out)
    recorded = record["options"]
    if given["epochs"] is not None:  # a new length in epochs replaces the recorded step count, and the reverse
        given = {**given, "max_steps": None}
        recorded = {**recorded, "max_steps": None}
    elif given["max_steps"] is not None:
        recorded = {**recorded, "epochs": None}
    options = merge_given(out, "finetune", recorded, given, CHANGEABLE)
    for name, digest in record.get("data_sha256", {}).items():
        path = Path(options[name])
        now = fingerprint_sources(path)[0]["sha256"] if path.is_file() else None
        if now != digest:
            raise TrainingError(f"{path} is {'missing' if now is None else 'not the file'} this run started with "
                                "(fine-tuning reads it again on --resume, so the run would go on with other "
                                "examples): put the original back, or start a new run with --force or another --out")
    state = ckpt.read_trainer_state(existing)
    changes = describe_changes(record["options"], options)
    say(f"resuming {out} from {existing} at step {state['step']} (model {options['model']}, data {options['data']})"
        + (f"; changed: {changes}" if changes else ""))
    return existing, options


def sft_loss(forward: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loop's mean cross-entropy over targets that are not -100, with the LM head applied only there.

    In chat data most positions are prompt (no target); skipping their projection onto the 49k-word
    vocabulary saves the largest matrix product of those positions and its [B, T, V] logits.
    """
    if not hasattr(forward, "hidden_states") or _fsdp_module(forward):  # wrapped (compiled, DDP, FSDP): plain path
        return lm_loss(forward(x), y)
    keep = y != IGNORE
    hidden = forward.hidden_states(x)[keep]  # (N, C): the positions with a target
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    return F.cross_entropy(forward.logits(hidden).float(), y[keep])


def _fsdp_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` is sharded by FSDP2, whose weights are gathered only around ``forward``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _train_config(o: dict, batches_per_epoch: int) -> TrainConfig:
    if o["max_steps"] is not None:
        steps = o["max_steps"]
    else:
        steps = max(1, math.ceil((o["epochs"] or 1.0) * batches_per_epoch / o["grad_accum_steps"]))
    lr = o["lr"] if o["lr"] is not None else DEFAULT_LR[o["method"]]
    warmup = o["warmup_steps"] if o["warmup_steps"] is not None else max(1, steps // 20)
    eval_interval = o["eval_interval"] or max(1, steps // 5)
    return TrainConfig(max_steps=steps, batch_size=o["batch_size"], grad_accum_steps=o["grad_accum_steps"], lr=lr,
                       min_lr=lr / 10, warmup_steps=min(warmup, steps), weight_decay=o["weight_decay"],
                       eval_interval=eval_interval, eval_batches=1, dtype=o["dtype"], seed=o["seed"],
                       activation_checkpointing=o["activation_checkpointing"],
                       optimizer=o.get("optimizer") or "adamw", momentum=o.get("momentum") or 0.9)


def _legacy_record(out: Path) -> dict:
    """The record of a run from before run.json: its finetune.json held the options as given."""
    path = out / "finetune.json"
    if not path.is_file():
        raise TrainingError(f"{out} has a checkpoint but no {RUN_FILE}, so its options are unknown: start a new run "
                            "with --force or another --out")
    saved = read_json(path)
    options = given_options(FinetuneOptions(**{name: saved.get(name) for name in OPTION_NAMES}))
    return {"options": {**options, **{k: v for k, v in DEFAULTS.items() if options[k] is None},
                        "targets": list(parse_targets(options["targets"] or DEFAULTS["targets"]))}}


# Where PEFT users find a known model's weights (``base_model_name_or_path`` of the adapters we write).
HF_REPOS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def _base_name(model: str) -> str:
    """``base_model_name_or_path`` for PEFT: the HF repository of a known model, else what was given."""
    return HF_REPOS.get(str(model), str(model))


def _describe_memory(model: torch.nn.Module, n_base: int, say) -> None:
    from scratchlm.finetune.nf4 import frozen_weight_bytes

    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)
    say(f"trainable parameters: {trainable:,} ({100 * trainable / n_base:.2f}% of the base model's {n_base:,}); "
        f"frozen weights: {frozen_weight_bytes(model) / 2**20:.1f} MiB")
