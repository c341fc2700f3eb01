"""Sequence classification: ``scratchlm finetune MODEL --task classify --labels a,b,c --data texts.jsonl``.

The data is one ``{"text": "...", "label": "b"}`` per line. The model is the pretrained transformer with a linear
head of one output per label, read at the last token of the text (``heads.HeadModel``, the shape of HF's
``LlamaForSequenceClassification``), trained with cross-entropy; LoRA (the head trains in full, as PEFT's
``modules_to_save``) or every weight. The texts are tokenized as they are, without a chat template, and cut to
``--max-length`` tokens.

It runs in the fine-tuning loop with everything that comes with it (``--resume``, ``best/`` and ``last/``,
``metrics.jsonl``, ``loss.png``), and with the transfer-learning controls of ``freeze.py`` and the optimizers of
``train/optim.py``. Each evaluation reports loss, accuracy and macro F1; ``classification_report`` over the
predictions gives per-class precision, recall and F1. ``best/`` is a head-model directory:

    model, llm = heads.load_head_model("runs/cls/best")
    labels = predict(model, llm.tokenizer, ["what a great film"])        # ["positive"]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from scratchlm.errors import ConfigError, DataError
from scratchlm.finetune.data import SFTBatches, read_jsonl


@dataclass
class Labelled:
    """One tokenized text and the index of its label."""

    ids: list[int]
    label: int
    line: int


def parse_labels(labels: str | list[str] | None) -> list[str]:
    """``"a,b,c"`` or a list -> the label names, checked (at least two, no repeats)."""
    if labels is None:
        raise ConfigError("--task classify needs --labels, the class names in order, for example "
                          "--labels negative,neutral,positive")
    names = [s.strip() for s in labels.split(",")] if isinstance(labels, str) else [str(s).strip() for s in labels]
    names = [n for n in names if n]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ConfigError(f"--labels needs two or more different names, got {names}")
    return names


def load_labelled(path: str | Path, labels: list[str], tokenizer, max_length: int) -> list[Labelled]:
    """Read ``{"text", "label"}`` JSONL; a DataError names the line of a missing field or an unknown label."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for line, record in read_jsonl(path):
        where = f"{path}, line {line}"
        text, label = record.get("text"), record.get("label")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: expected {{\"text\": \"...\", \"label\": \"...\"}} with a non-empty text, got "
                            f"the keys {sorted(record)}")
        if str(label) not in index:
            raise DataError(f"{where}: label {label!r} is not one of --labels {','.join(labels)}")
        ids = tokenizer.encode(text)[:max_length]
        out.append(Labelled(ids, index[str(label)], line))
    return out


def collate_labelled(examples: list[Labelled], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and ``y`` [B, 2]: each row's length and label (what the loss needs)."""
    x = torch.full((len(examples), max(len(e.ids) for e in examples)), pad_id, dtype=torch.long)
    for row, e in enumerate(examples):
        x[row, :len(e.ids)] = torch.tensor(e.ids)
    y = torch.tensor([[len(e.ids), e.label] for e in examples], dtype=torch.long)
    return x, y


class LabelledBatches(SFTBatches):
    """``SFTBatches``' seeded, resumable order over labelled texts."""

    collate = staticmethod(collate_labelled)


def classify_loss(forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the head's logits at each text's last token against its label."""
    return F.cross_entropy(forward(x, y[:, 0]).float(), y[:, 1])


@torch.no_grad()
def evaluate_classifier(model, batches) -> dict:
    """Validation loss, accuracy and macro F1 (``eval.classification``) over fixed batches."""
    from scratchlm.eval.classification import classification_report

    was_training = model.training
    model.eval()
    total, count, predicted, reference = 0.0, 0, [], []
    for x, y in batches:
        logits = model(x, y[:, 0]).float()
        total += float(F.cross_entropy(logits, y[:, 1], reduction="sum"))
        count += len(y)
        predicted += logits.argmax(-1).tolist()
        reference += y[:, 1].tolist()
    model.train(was_training)
    names = [str(i) for i in range(model.n_outputs)]
    report = classification_report([names[i] for i in predicted], [names[i] for i in reference], names)
    return {"val_loss": total / max(count, 1), "val_accuracy": report.accuracy,
            "val_macro_f1": report.averages["macro"][2]}


@torch.no_grad()
def predict(model, tokenizer, texts: list[str], max_length: int | None = None, batch_size: int = 16) -> list[str]:
    """The label of each text under a trained classifier (``heads.load_head_model`` of a ``--task classify``
    run)."""
    if not model.labels:
        raise ConfigError("this head model has no label names: it is not a classifier")
    max_length = max_length or model.config.context_length
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = [Labelled(tokenizer.encode(t)[:max_length] or [pad], 0, 0) for t in texts[start:start + batch_size]]
        x, y = collate_labelled(chunk, pad)
        out += [model.labels[i] for i in model(x, y[:, 0]).argmax(-1).tolist()]
    return out


def run_classify(o: dict, out: Path, resume_dir: Path | None, progress: bool, say=print):
    """The classification branch of ``run_finetune``: ``o`` holds the settled options (``task`` "classify")."""
    import time

    from scratchlm.align.run import AlignReport, MetricStash
    from scratchlm.finetune.freeze import TransferControls
    from scratchlm.finetune.lora import LoraSettings, apply_lora, lora_parameter_names, parse_targets
    from scratchlm.finetune.run import _data_fingerprints, _describe_memory, _train_config
    from scratchlm.heads import HeadModel, load_head, save_head_model
    from scratchlm.llm import LLM
    from scratchlm.train.loop import train
    from scratchlm.train.record import write_record

    labels = parse_labels(o["labels"])
    o["labels"] = labels
    if o["method"] == "qlora":
        raise ConfigError("--task classify trains with --method lora or full")
    start = time.perf_counter()
    llm = LLM.load(o["model"], dequantize=True, compile=False)
    model, tokenizer = llm.model, llm.tokenizer
    say(f"loaded {llm.name} in {time.perf_counter() - start:.1f} s: {model.num_parameters() / 1e6:.1f}M parameters")
    max_length = o["max_length"] or min(model.config.context_length, 512)
    examples = load_labelled(o["data"], labels, tokenizer, max_length)
    if o["val_data"] is not None:
        train_examples, val_examples = examples, load_labelled(o["val_data"], labels, tokenizer, max_length)
    else:
        from scratchlm.finetune.data import split_examples

        train_examples, val_examples = split_examples(examples, o["val_fraction"], o["seed"])
    counts = ", ".join(f"{name} {sum(e.label == i for e in train_examples)}" for i, name in enumerate(labels))
    say(f"{len(train_examples)} training texts ({counts}) and {len(val_examples)} validation texts")

    settings, fingerprint, n_base = None, None, model.num_parameters()
    if o["method"] == "lora":
        from scratchlm.finetune.peft import base_fingerprint, check_peft_layout

        check_peft_layout(model.config)
        settings = LoraSettings(o["rank"], o["alpha"], o["dropout"], parse_targets(o["targets"], model.config.mlp))
        fingerprint = base_fingerprint(model)
        apply_lora(model, settings, seed=o["seed"])
    torch.manual_seed(o["seed"])
    classifier = HeadModel(model, len(labels), labels, task="classify")
    if settings is not None:
        trainable = ["body." + n for n in lora_parameter_names(model)]
    else:
        trainable = [n for n, _ in classifier.named_parameters() if n.startswith("body.")]
    trainable += [n for n, _ in classifier.named_parameters() if n.startswith("head.")]
    controls = TransferControls(model.config.n_layers, o.get("freeze_layers") or 0, o.get("unfreeze_every"),
                                o.get("layer_lr_decay") or 1.0)
    trainable = controls.trainable(trainable)
    if controls.active:
        say(f"transfer learning: {controls.describe()}")
    for p in classifier.parameters():
        p.requires_grad_(False)
    for name, p in classifier.named_parameters():
        p.requires_grad_(name in set(trainable))
    _describe_memory(classifier, n_base, say)

    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    batches = LabelledBatches(train_examples, o["batch_size"], pad_id, o["seed"])
    ordered = sorted(val_examples, key=lambda e: len(e.ids))
    val = [collate_labelled(ordered[i:i + o["batch_size"]], pad_id)
           for i in range(0, len(ordered), o["batch_size"])] or None
    config = _train_config(o, batches.batches_per_epoch)
    say(f"classify ({o['method']}, {o.get('optimizer') or 'adamw'}): {config.max_steps} steps of {o['batch_size']} x "
        f"{config.grad_accum_steps} texts, lr {config.lr:g}")
    o.update(max_steps=config.max_steps, lr=config.lr, warmup_steps=config.warmup_steps,
             eval_interval=config.eval_interval, max_length=max_length)
    write_record(out, "finetune", o, data_sha256=_data_fingerprints(o))

    def save_model(directory: Path) -> None:
        save_head_model(directory, classifier, tokenizer, llm.template.source, lora=settings, base_model=o["model"],
                        fingerprint=fingerprint)

    def load_model(directory: Path) -> None:
        if settings is not None:
            from scratchlm.finetune.peft import load_adapter

            load_adapter(model, directory, merge=False, check_base=False)
        else:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(directory / "model.safetensors"), strict=False)
        load_head(classifier, directory)

    stash = MetricStash()
    reporter = AlignReport(out, progress, stash)
    result = train(classifier, config, batches, val, trainable=trainable, out_dir=out, save_model=save_model,
                   resume_from=resume_dir, reporter=reporter, load_model=load_model, loss_fn=classify_loss,
                   evaluate_fn=evaluate_classifier, lr_scale=controls.lr_scale if controls.layer_lr_decay != 1.0
                   else None, before_step=controls.before_step(classifier, trainable))
    evals = [r for r in result.history if "val_accuracy" in r]
    summary = (f"; validation accuracy {evals[-1]['val_accuracy']:.1%}, macro F1 {evals[-1]['val_macro_f1']:.3f}"
               if evals else "")
    say(f"done: {result.step} steps in {result.elapsed:.0f} s{summary}")
    final = out / ("best" if val is not None else "last")
    say(f"wrote {out}: classifier {final} (heads.load_head_model reads it); {out / 'last'} continues with "
        f"`scratchlm finetune --out {out} --resume`; curves {out / 'loss.png'}, {out / 'metrics.jsonl'}")
    return result
