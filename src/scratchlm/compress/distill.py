"""Knowledge distillation: a small student learns a big teacher's next-token distributions.

    result = run_distill(DistillOptions(teacher="smollm2-135m-instruct", student="runs/small", data="corpus.txt",
                                        out="runs/distilled", max_steps=500))

The loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", section 2) mixes the
forward KL divergence between the teacher's and the student's distributions, both softened by a temperature T,
with the usual cross-entropy on the text:

    p = softmax(teacher_logits / T),  q = softmax(student_logits / T)
    loss = alpha * T^2 * KL(p || q)  +  (1 - alpha) * CE(student_logits, next token)

The T^2 keeps the soft term's gradients the same size whatever T is (the gradient of KL at temperature T
scales as 1/T^2). Both terms are means over the positions that have a target. With ``top_k`` the teacher's
distribution is cut to its k most likely tokens and renormalised, which is what a cache on disk can hold:
``teacher_cache`` stores those k logits and ids per batch, so a second student trained on the same data and
teacher reads them instead of running the teacher again.

The training itself is the pre-training loop (``train.loop.train``) with this loss as its ``loss_fn``: same
progress bar, ``metrics.jsonl``, ``loss.png``, ``best/`` and ``last/`` checkpoints (the student, a model
directory), exact ``--resume`` from ``run.json``. The plotted training loss is the mixed loss; the validation
loss is the student's plain cross-entropy, comparable with any other run on the same text.

Minitron (Muralidharan et al. 2024) is structured pruning then distillation: give a model written by
``scratchlm prune --method structured`` as the student and the unpruned model as the teacher.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from scratchlm.errors import ConfigError, ModelFileError
from scratchlm.files import atomic_write_bytes, atomic_write_json, read_json
from scratchlm.train.loop import lm_loss


# ---- the loss ---------------------------------------------------------------------------------------
def _mean_over_targets(per_token: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    keep = targets != -100
    return (per_token * keep).sum() / keep.sum().clamp(min=1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), the mean over positions whose target is not -100.

    Logits are [B, T, V]; computed in float32 (bfloat16 log-softmax over 49k tokens loses the small terms).
    """
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # [B, T]
    return t * t * _mean_over_targets(kl, targets)


def topk_kd_loss(student_logits: torch.Tensor, top_logits: torch.Tensor, top_ids: torch.Tensor,
                 targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``kd_loss`` against a teacher cut to its top k tokens: top_logits and top_ids are [B, T, k].

    The teacher's k probabilities are renormalised to sum to 1; the student's log-probabilities are taken over
    the whole vocabulary at those k ids (so mass the student puts elsewhere is still penalised through them).
    """
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, top_ids.long())
    log_p = F.log_softmax(top_logits.float() / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return t * t * _mean_over_targets(kl, targets)


def distillation_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                      top: tuple[torch.Tensor, torch.Tensor] | None = None, temperature: float = 1.0,
                      alpha: float = 0.5) -> torch.Tensor:
    """alpha * (soft-target KL, T^2-scaled) + (1 - alpha) * cross-entropy; the teacher as full logits or ``top``
    (its top-k logits and ids)."""
    soft = (kd_loss(student_logits, teacher_logits, targets, temperature) if top is None
            else topk_kd_loss(student_logits, *top, targets, temperature))
    if alpha == 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * lm_loss(student_logits, targets)


def check_loss_options(temperature: float, alpha: float, top_k: int | None, vocab_size: int | None = None) -> None:
    if not temperature > 0:
        raise ConfigError(f"--temperature must be positive, got {temperature:g}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--alpha (the weight of the teacher's soft targets) must be in [0, 1], got {alpha:g}")
    if top_k is not None and (top_k < 1 or (vocab_size is not None and top_k > vocab_size)):
        raise ConfigError(f"--top-k must be between 1 and the vocabulary size ({vocab_size}), got {top_k}")


# ---- the teacher's targets ----------------------------------------------------------------------------
class TeacherTargets:
    """The teacher's logits for a batch: computed on the fly, or (``top_k``) its top k, optionally cached on disk.

    The cache holds one safetensors file per batch, named by the SHA-256 of the batch's token ids, and a
    ``teacher.json`` that names the teacher and k; a cache made by another teacher or k is refused.
    """

    def __init__(self, teacher: torch.nn.Module, top_k: int | None = None, cache: str | Path | None = None,
                 identity: dict | None = None):
        self.teacher, self.top_k = teacher, top_k
        self.cache = Path(cache) if cache is not None else None
        self.hits = self.misses = 0
        if self.cache is not None:
            if top_k is None:
                raise ConfigError("--teacher-cache stores the teacher's top-k tokens: give --top-k K too")
            meta = {**(identity or {}), "top_k": top_k}
            meta_file = self.cache / "teacher.json"
            if meta_file.is_file():
                found = read_json(meta_file)
                if found != meta:
                    raise ConfigError(f"{self.cache} caches another teacher or k ({found}); this run has {meta}: "
                                      "give another --teacher-cache directory")
            else:
                self.cache.mkdir(parents=True, exist_ok=True)
                atomic_write_json(meta_file, meta)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> dict:
        """``{"teacher_logits": [B, T, V]}`` or ``{"top": (logits [B, T, k], ids [B, T, k])}``."""
        if self.top_k is None:
            return {"teacher_logits": self.teacher(x)}
        path = None
        if self.cache is not None:
            key = hashlib.sha256(x.cpu().numpy().tobytes() + str(tuple(x.shape)).encode()).hexdigest()
            path = self.cache / f"{key[:32]}.safetensors"
            if path.is_file():
                from safetensors.torch import load_file

                saved = load_file(path)
                self.hits += 1
                return {"top": (saved["logits"].to(x.device), saved["ids"].to(x.device))}
        logits, ids = torch.topk(self.teacher(x).float(), self.top_k, dim=-1)
        self.misses += 1
        if path is not None:
            from safetensors.torch import save

            atomic_write_bytes(path, save({"logits": logits.cpu().contiguous(), "ids": ids.int().cpu().contiguous()}))
        return {"top": (logits, ids)}


# ---- the run ------------------------------------------------------------------------------------------
@dataclass
class DistillOptions:
    """Everything ``scratchlm distill`` can be told. None means "not given": ``DEFAULTS`` for a new run, the
    recorded value (``OUT/run.json``) for ``resume=True``, which needs only ``out``."""

    teacher: str | None = None  # a known name, .gguf file or model directory
    student: str | None = None  # a model (name, file, directory) or an architecture (preset name, config .json)
    data: str | Path | None = None  # text file, folder or JSONL (as ``scratchlm train --data``)
    out: str | Path | None = None
    temperature: float | None = None  # 2.0
    alpha: float | None = None  # 0.5: weight of the soft targets (1 - alpha on the cross-entropy)
    top_k: int | None = None  # None: the teacher's full distribution
    teacher_cache: str | Path | None = None  # directory for the teacher's top-k per batch
    max_steps: int | None = None  # 1000
    batch_size: int | None = None  # 8
    grad_accum_steps: int | None = None  # 1
    context_length: int | None = None  # the student's context, at most 512
    lr: float | None = None  # 3e-4 for a pretrained student, 1e-3 for a new one
    min_lr: float | None = None  # lr / 10
    warmup_steps: int | None = None  # 5% of the steps
    weight_decay: float | None = None  # 0.1
    eval_interval: int | None = None  # 5 evaluations per run
    eval_batches: int | None = None  # 20
    val_fraction: float | None = None  # 0.1
    dtype: str | None = None  # float32 or bfloat16
    seed: int | None = None  # 0
    resume: bool = False
    force: bool = False
    progress: bool = True


DEFAULTS = dict(temperature=2.0, alpha=0.5, max_steps=1000, batch_size=8, grad_accum_steps=1, weight_decay=0.1,
                eval_batches=20, val_fraction=0.1, dtype="float32", seed=0)
OPTION_NAMES = tuple(f.name for f in fields(DistillOptions) if f.name not in ("out", "resume", "force", "progress"))
CHANGEABLE = ("max_steps", "eval_interval", "teacher_cache")


def _absolute_if_path(value):
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else str(value)


def given_options(opts: DistillOptions) -> dict:
    given = {name: getattr(opts, name) for name in OPTION_NAMES}
    for name in ("teacher", "student", "data"):
        given[name] = _absolute_if_path(given[name])
    if opts.teacher_cache is not None:  # may not exist yet
        given["teacher_cache"] = str(Path(opts.teacher_cache).expanduser().resolve())
    return given


def student_architecture(student: str, vocab_size: int):
    """The ModelConfig named by ``student`` when it is an architecture (a preset name or a config .json file),
    with the teacher's vocabulary; None when ``student`` is a model to load."""
    from scratchlm.config import PRESETS, ModelConfig

    if student in PRESETS:
        return PRESETS[student].replace(vocab_size=vocab_size)
    path = Path(student).expanduser()
    if path.suffix == ".json" and path.is_file():
        data = read_json(path)
        given = data.get("vocab_size")
        if given is not None and given != vocab_size:
            raise ConfigError(f"the student config {path} has a vocabulary of {given} tokens, the teacher's tokenizer "
                              f"{vocab_size}: distillation compares their distributions token by token, so the "
                              "vocabularies must be the same (drop vocab_size from the config)")
        return ModelConfig.from_dict({**data, "vocab_size": vocab_size})
    return None


def check_same_tokenizer(teacher, student, student_name: str) -> None:
    """A ConfigError unless the student's tokenizer is the teacher's (same vocabulary, merges and specials)."""
    from scratchlm.train.data import tokenizer_fingerprint

    if student.config.vocab_size != teacher.config.vocab_size:
        raise ConfigError(f"the student {student_name} has a vocabulary of {student.config.vocab_size} tokens and the "
                          f"teacher {teacher.config.vocab_size}: distillation needs the same tokenizer in both; give a "
                          "student made from the teacher (scratchlm prune) or an architecture (preset or config .json)")
    if tokenizer_fingerprint(student.tokenizer) != tokenizer_fingerprint(teacher.tokenizer):
        raise ConfigError(f"the student {student_name} has another tokenizer than the teacher (same size, different "
                          "tokens or merges): distillation needs the same tokenizer in both")


def run_distill(opts: DistillOptions, say=print):
    """Distil as ``opts`` says (or resume the run in ``opts.out``); returns the training loop's result."""
    from scratchlm.llm import LLM
    from scratchlm.model import Transformer
    from scratchlm.train import checkpoint as ckpt
    from scratchlm.train.record import RUN_FILE, describe_changes, merge_given, read_record, write_record
    from scratchlm.train.run import clear_out_dir

    if opts.out is None:
        raise ConfigError("give --out, the directory for the student's checkpoints and curves")
    out = Path(opts.out)
    given = given_options(opts)
    if opts.resume:
        record = read_record(out, "distill")
        resume_dir = ckpt.resolve_checkpoint(out / "last")
        if record is None or resume_dir is None:
            raise ModelFileError(f"no distillation run to resume in {out} (no {RUN_FILE} or no last/ checkpoint): "
                                 "start one without --resume")
        o = merge_given(out, "distill", record["options"], given, CHANGEABLE)
        changes = describe_changes(record["options"], o)
        say(f"resuming {out} from step {ckpt.read_trainer_state(resume_dir)['step']}"
            + (f"; changed: {changes}" if changes else ""))
    else:
        for name in ("teacher", "student", "data"):
            if given[name] is None:
                raise ConfigError("give --teacher, --student and --data (only --resume takes them from run.json)")
        o = {**given, **{k: v for k, v in DEFAULTS.items() if given[k] is None}}
        resume_dir = None
    check_loss_options(o["temperature"], o["alpha"], o["top_k"])
    if o["teacher_cache"] is not None and o["top_k"] is None:
        raise ConfigError("--teacher-cache stores the teacher's top-k tokens: give --top-k K too")

    start = time.perf_counter()
    teacher = LLM.load(o["teacher"], dequantize=True, compile=False)
    teacher.model.requires_grad_(False).eval()
    vocab = teacher.config.vocab_size
    check_loss_options(o["temperature"], o["alpha"], o["top_k"], vocab)
    say(f"teacher {teacher.name}: {teacher.model.num_parameters() / 1e6:.1f}M parameters "
        f"({time.perf_counter() - start:.1f} s to load)")

    # The student: a checkpoint when resuming, else a model to load or an architecture to initialise.
    if resume_dir is not None:
        from scratchlm.config import ModelConfig
        from scratchlm.formats.checkpoint import CONFIG_FILE

        student_model = Transformer(ModelConfig.from_dict(read_json(resume_dir / CONFIG_FILE)))
        initialised = "its checkpoint"
    else:
        config = student_architecture(o["student"], vocab)
        if config is not None:
            torch.manual_seed(o["seed"])
            student_model = Transformer(config)
            initialised = "random weights"
        else:
            student = LLM.load(o["student"], dequantize=True, compile=False)
            check_same_tokenizer(teacher, student, o["student"])
            student_model = student.model
            initialised = f"the weights of {o['student']}"
    student_model.requires_grad_(True)
    say(f"student: {student_model.num_parameters() / 1e6:.1f}M parameters "
        f"({100 * student_model.num_parameters() / teacher.model.num_parameters():.0f}% of the teacher), "
        f"{student_model.config.n_layers} layers, from {initialised}")

    if not opts.resume:
        existing = ckpt.resolve_checkpoint(out / "last")
        if existing is not None and not opts.force:
            step = ckpt.read_trainer_state(existing)["step"]
            raise ConfigError(f"{out} already holds a run (checkpoint at step {step}): continue it with "
                              f"`scratchlm distill --out {out} --resume`, replace it with --force, or write "
                              "elsewhere with --out ANOTHER_DIR")
        clear_out_dir(out, True, "distillation")
        out.mkdir(parents=True, exist_ok=True)
    o["context_length"] = o["context_length"] or min(student_model.config.context_length,
                                                     teacher.config.context_length, 512)
    limit = min(student_model.config.context_length, teacher.config.context_length)
    if o["context_length"] > limit:
        raise ConfigError(f"--context-length {o['context_length']} exceeds the student's or teacher's context "
                          f"({limit})")
    o["lr"] = o["lr"] or (1e-3 if initialised == "random weights" else 3e-4)
    o["min_lr"] = o["min_lr"] if o["min_lr"] is not None else o["lr"] / 10
    o["warmup_steps"] = o["warmup_steps"] if o["warmup_steps"] is not None else max(1, o["max_steps"] // 20)
    o["eval_interval"] = o["eval_interval"] or max(1, o["max_steps"] // 5)

    from scratchlm.train.data import RandomBatches, eval_batches, prepare_dataset
    from scratchlm.train.loop import TrainConfig, train
    from scratchlm.train.report import TrainingReport

    prepared = prepare_dataset(o["data"], teacher.tokenizer, out / "data", o["val_fraction"], progress=opts.progress)
    prepared.check_fits(o["context_length"])
    config = TrainConfig(max_steps=o["max_steps"], batch_size=o["batch_size"], grad_accum_steps=o["grad_accum_steps"],
                         lr=o["lr"], min_lr=o["min_lr"], warmup_steps=o["warmup_steps"],
                         weight_decay=o["weight_decay"], dtype=o["dtype"], eval_interval=o["eval_interval"],
                         eval_batches=o["eval_batches"], seed=o["seed"])
    batches = RandomBatches(prepared.train(), config.batch_size, o["context_length"], config.seed)
    val = eval_batches(prepared.val(), config.batch_size, o["context_length"], config.eval_batches)
    if not opts.resume:
        from scratchlm.train.distributed import Dist
        from scratchlm.train.loop import evaluate

        teacher_val = evaluate(teacher.model, val, config, Dist())
        say(f"teacher's validation loss on {o['data']}: {teacher_val:.4f}")
        write_record(out, "distill", o, teacher_val_loss=teacher_val)
    else:
        extra = {k: v for k, v in read_record(out, "distill").items() if k not in ("version", "command", "options")}
        write_record(out, "distill", o, **extra)

    identity = {"teacher": o["teacher"], "data_key": prepared.meta["key"]}
    targets = TeacherTargets(teacher.model, o["top_k"], o["teacher_cache"], identity)

    def loss_fn(forward, x, y):
        if o["alpha"] == 0:  # cross-entropy only: the same run without the teacher (a baseline), no teacher pass
            return lm_loss(forward(x), y)
        return distillation_loss(forward(x), y, **targets(x), temperature=o["temperature"], alpha=o["alpha"])

    from scratchlm.formats.checkpoint import save_model_dir

    def save_model(directory: Path) -> None:
        save_model_dir(directory, student_model.config, student_model.canonical_state_dict(), teacher.tokenizer,
                       teacher.template.source)

    from scratchlm.train.report import sample_text

    reporter = TrainingReport(out, progress=opts.progress,
                              sample=lambda: sample_text(student_model, teacher.tokenizer, "\n", 40))
    say(f"distilling: {config.max_steps} steps of {config.batch_size} x {o['context_length']} tokens, "
        f"T={o['temperature']:g}, alpha={o['alpha']:g}"
        + (f", teacher top-{o['top_k']}" if o["top_k"] else "") + f", lr {config.lr:g}")
    result = train(student_model, config, batches, val, out_dir=out, save_model=save_model, resume_from=resume_dir,
                   reporter=reporter, loss_fn=loss_fn)
    if targets.cache is not None:
        say(f"teacher cache {targets.cache}: {targets.hits} batches read, {targets.misses} computed")
    if result.best_val_loss is not None:
        say(f"done: {result.step} steps in {result.elapsed:.0f} s; best validation loss {result.best_val_loss:.4f}")
    say(f"wrote {out}: the student in {out / 'best'} (lowest validation loss) and {out / 'last'} (continue with "
        f"`scratchlm distill --out {out} --resume`), curves {out / 'loss.png'} and {out / 'metrics.jsonl'}")
    return result
