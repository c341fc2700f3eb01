"""``scratchlm finetune``: a pretrained model + chat JSONL -> an adapter (LoRA, QLoRA) or new weights (full).

    result = run_finetune(FinetuneOptions(model="smollm2-135m-instruct", data="task/train.jsonl",
                                          out="runs/task", method="lora", epochs=1))

The training itself is the pre-training loop (``train.loop.train``): same progress bar, ``metrics.jsonl``,
``loss.png``, ``best/`` and ``last/`` checkpoints and exact ``--resume``. Fine-tuning gives it

* batches whose targets are -100 outside the assistant's tokens (``finetune.data``),
* which parameters train: the LoRA matrices, or everything (full),
* how to write and read the model part of a checkpoint: a PEFT adapter for LoRA/QLoRA, so ``last/``
  and ``best/`` are adapters that PEFT and ``--adapter`` read, or a model directory for full.

Files in ``out``: ``best/`` and ``last/`` (checkpoints), ``metrics.jsonl``, ``loss.png``, ``data.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from scratchlm.errors import ConfigError, TrainingError
from scratchlm.files import atomic_write_json
from scratchlm.finetune.data import IGNORE, fixed_batches, load_examples, read_jsonl, split_examples, to_messages
from scratchlm.finetune.lora import DEFAULT_TARGETS, LoraSettings, apply_lora, lora_parameter_names, parse_targets
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.loop import TrainConfig, TrainResult, lm_loss, train
from scratchlm.train.run import clear_out_dir

METHODS = ("lora", "qlora", "full")
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}


@dataclass
class FinetuneOptions:
    """Everything ``scratchlm finetune`` can be told."""

    model: str
    data: str | Path
    out: str | Path
    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # PEFT's default
    targets: str | tuple[str, ...] = DEFAULT_TARGETS
    epochs: float | None = None  # None and no max_steps: 1 epoch
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float | None = None  # None: 2e-4 for LoRA/QLoRA, 2e-5 for full
    warmup_steps: int | None = None  # None: 5% of the steps
    weight_decay: float = 0.0
    max_length: int | None = None  # None: the model's context, at most 1024
    too_long: str = "truncate"
    val_data: str | Path | None = None
    val_fraction: float = 0.1
    eval_interval: int | None = None  # None: 5 evaluations per run
    dtype: str = "float32"
    activation_checkpointing: bool = False
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


def run_finetune(opts: FinetuneOptions, say=print) -> TrainResult:
    """Fine-tune as ``opts`` says; returns the loop's result. Checkpoints and curves go to ``opts.out``."""
    from scratchlm.llm import LLM

    if opts.method not in METHODS:
        raise ConfigError(f"unknown method {opts.method!r}; choose one of {', '.join(METHODS)}")
    if opts.epochs is not None and opts.max_steps is not None:
        raise ConfigError("give --epochs or --max-steps, not both")
    if opts.epochs is not None and opts.epochs <= 0:
        raise ConfigError(f"--epochs must be positive, got {opts.epochs}")
    if opts.method != "full":
        parse_targets(opts.targets)  # unknown names fail before the slow part (checked again for the model)
        LoraSettings(opts.rank, opts.alpha, opts.dropout)
    for path in (opts.data, opts.val_data):
        if path is not None:  # malformed lines, unknown roles, missing assistant turns: before loading
            for number, record in read_jsonl(path):
                to_messages(record, f"{path}, line {number}")
    out = Path(opts.out)
    resume_dir = _check_out_dir(out, opts)

    start = time.perf_counter()
    llm = LLM.load(opts.model)
    model, tokenizer, template = llm.model, llm.tokenizer, llm.template
    say(f"loaded {llm.name} in {time.perf_counter() - start:.1f} s: {model.num_parameters() / 1e6:.1f}M parameters")

    # Data: render, tokenize, split.
    max_length = opts.max_length or min(model.config.context_length, 1024)
    if max_length > model.config.context_length + 1:
        raise ConfigError(f"--max-length {max_length} exceeds the model's context of {model.config.context_length}")
    examples, stats = load_examples(opts.data, template, tokenizer, max_length, opts.too_long)
    say(f"data {opts.data}: {stats.describe(max_length)}")
    if opts.val_data is not None:
        train_examples = examples
        val_examples, val_stats = load_examples(opts.val_data, template, tokenizer, max_length, opts.too_long)
        say(f"validation {opts.val_data}: {val_stats.describe(max_length)}")
    else:
        train_examples, val_examples = split_examples(examples, opts.val_fraction, opts.seed)
    say(f"{len(train_examples)} training and {len(val_examples)} validation examples")

    # Method: which weights train, and what a checkpoint holds.
    settings = None
    fingerprint = None
    n_base = model.num_parameters()
    if opts.method == "full":
        trainable = None
        model.requires_grad_(True)
    else:
        from scratchlm.finetune.peft import base_fingerprint, check_peft_layout

        check_peft_layout(model.config)
        settings = LoraSettings(opts.rank, opts.alpha, opts.dropout, parse_targets(opts.targets, model.config.mlp))
        fingerprint = base_fingerprint(model)
        if opts.method == "qlora":
            from scratchlm.finetune.nf4 import quantize_base

            quantize_base(model)
        apply_lora(model, settings, seed=opts.seed)
        trainable = lora_parameter_names(model)
    _describe_memory(model, n_base, say)

    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    from scratchlm.finetune.data import SFTBatches

    batches = SFTBatches(train_examples, opts.batch_size, pad_id, opts.seed)
    val = fixed_batches(val_examples, opts.batch_size, pad_id) if val_examples else None
    config = _train_config(opts, batches.batches_per_epoch)
    say(f"{opts.method}: {config.max_steps} steps of {opts.batch_size} x {config.grad_accum_steps} examples "
        f"({config.max_steps * config.grad_accum_steps / batches.batches_per_epoch:.2f} epochs), lr {config.lr:g}")

    base_name = _base_name(opts.model)

    def save_model(directory: Path) -> None:
        if settings is None:
            save_model_dir(directory, model.config, model.canonical_state_dict(), tokenizer, template.source)
        else:
            from scratchlm.finetune.peft import save_adapter

            save_adapter(directory, model, settings, base_name, fingerprint)

    def load_model(directory: Path) -> None:
        from scratchlm.finetune.peft import load_adapter

        load_adapter(model, directory, merge=False, check_base=False)

    atomic_write_json(out / "finetune.json", {**asdict(opts), "data": str(opts.data), "out": str(out),
                                              "val_data": None if opts.val_data is None else str(opts.val_data),
                                              "targets": list(settings.targets) if settings else None})
    from scratchlm.train.report import TrainingReport

    reporter = TrainingReport(out, progress=opts.progress, print_fn=None)
    start = time.perf_counter()
    result = train(model, config, batches, val, trainable=trainable, out_dir=out, save_model=save_model,
                   resume_from=resume_dir, reporter=reporter,
                   load_model=load_model if settings is not None else None, loss_fn=sft_loss)
    elapsed = time.perf_counter() - start
    best = f"; best validation loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
    say(f"done: {result.step} steps in {elapsed:.0f} s{best}")
    final = out / ("best" if val is not None else "last")
    if settings is not None:
        say(f"adapter (PEFT format): {final}{' (lowest validation loss)' if val is not None else ''}; "
            f"{out / 'last'} resumes with --resume\n"
            f"use it: scratchlm chat {opts.model} --adapter {final}   |   "
            f"scratchlm merge {opts.model} {final} --out merged")
    else:
        say(f"model: {final}{' (lowest validation loss)' if val is not None else ''}; {out / 'last'} resumes with "
            f"--resume\nuse it: scratchlm chat {final}")
    return result


def sft_loss(forward: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loop's mean cross-entropy over targets that are not -100, with the LM head applied only there.

    In chat data most positions are prompt (no target); skipping their projection onto the 49k-word
    vocabulary saves the largest matrix product of those positions and its [B, T, V] logits.
    """
    if not hasattr(forward, "hidden_states"):  # wrapped (compiled, DDP): the plain path
        return lm_loss(forward(x), y)
    keep = y != IGNORE
    hidden = forward.hidden_states(x)[keep]  # (N, C): the positions with a target
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    return F.cross_entropy(forward.logits(hidden).float(), y[keep])


def _train_config(opts: FinetuneOptions, batches_per_epoch: int) -> TrainConfig:
    if opts.max_steps is not None:
        steps = opts.max_steps
    else:
        steps = max(1, math.ceil((opts.epochs or 1.0) * batches_per_epoch / opts.grad_accum_steps))
    lr = opts.lr if opts.lr is not None else DEFAULT_LR[opts.method]
    warmup = opts.warmup_steps if opts.warmup_steps is not None else max(1, steps // 20)
    eval_interval = opts.eval_interval or max(1, steps // 5)
    return TrainConfig(max_steps=steps, batch_size=opts.batch_size, grad_accum_steps=opts.grad_accum_steps, lr=lr,
                       min_lr=lr / 10, warmup_steps=min(warmup, steps), weight_decay=opts.weight_decay,
                       eval_interval=eval_interval, eval_batches=1, dtype=opts.dtype, seed=opts.seed,
                       activation_checkpointing=opts.activation_checkpointing)


def _check_out_dir(out: Path, opts: FinetuneOptions) -> Path | None:
    """The checkpoint to resume from, or None; refuses to overwrite a run unless told to."""
    existing = ckpt.resolve_checkpoint(out / "last")
    if opts.resume:
        if existing is None:
            raise TrainingError(f"no checkpoint to resume from in {out / 'last'}: fine-tune without --resume first")
        saved = json.loads((out / "finetune.json").read_text(encoding="utf-8")) if (out / "finetune.json").is_file() \
            else {}
        for key in ("method", "rank", "alpha", "model", "data", "batch_size", "seed"):
            now = str(getattr(opts, key)) if key in ("model", "data") else getattr(opts, key)
            if key in saved and saved[key] != now:
                raise TrainingError(f"cannot resume {out}: {key} was {saved[key]!r}, now {now!r}; resume with the "
                                    "same options or fine-tune into a new --out")
        return existing
    clear_out_dir(out, opts.overwrite, "fine-tuning")
    out.mkdir(parents=True, exist_ok=True)
    return None


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
