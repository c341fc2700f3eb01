"""A reward model: the language model with a scalar head, trained on preferences (InstructGPT, section 3.5).

The model reads a whole conversation (prompt and answer, rendered with the chat template) and gives one number
at its last token (``scratchlm.heads.HeadModel`` with one output). It learns from pairs through the Bradley-Terry
model, P(chosen preferred to rejected) = sigmoid(r_chosen - r_rejected), by maximum likelihood:

    L = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))          (InstructGPT eq. 1, one pair per comparison)

Only differences matter, so a reward's zero point is arbitrary. Reported: the loss, the preference accuracy
(r_chosen > r_rejected) and the mean margin, on the training batches and the validation split.

    scratchlm align reward smollm2-135m-instruct --data prefs.jsonl --out runs/rm
    scratchlm align score runs/rm/best --data answers.jsonl

``OUT/best`` (and ``last``) is a head-model directory (``heads.save_head_model``): the head and, with LoRA, a PEFT
adapter for the base model, else the full body; ``heads.load_head_model`` reads it (the PPO step does).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from scratchlm.align.data import PairTargets, PreferenceBatches, fixed_pair_batches
from scratchlm.align.run import (
    DEFAULTS,
    AlignOptions,
    AlignReport,
    MetricStash,
    add_lora,
    check_data,
    clear_run_dir,
    load_model_and_pairs,
    record_run,
    settle_options,
)
from scratchlm.heads import HeadModel
from scratchlm.train.loop import TrainResult, autocast_context, train

REWARD_DEFAULTS = dict(DEFAULTS)
DEFAULT_LR = {"lora": 1e-4, "full": 1e-5}


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair loss -log sigmoid(r_chosen - r_rejected) [B]."""
    return -F.logsigmoid(chosen - rejected)


def pair_rewards(forward, x: torch.Tensor, batch: PairTargets) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards [B] of a batch of whole sequences (chosen rows, then rejected rows)."""
    return forward(x, batch.lengths).squeeze(-1).float().chunk(2)


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    return {"accuracy": (chosen > rejected).float().mean().item(), "margin": (chosen - rejected).mean().item(),
            "reward_mean": torch.cat([chosen, rejected]).mean().item()}


def evaluate_rewards(model: HeadModel, batches: list, dtype: str) -> dict:
    """Validation loss, preference accuracy, mean margin and mean reward over fixed batches (pair-weighted)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = {"val_loss": 0.0, "val_accuracy": 0.0, "val_margin": 0.0, "val_reward_mean": 0.0}
    n = 0
    with torch.no_grad():
        for x, batch in batches:
            with autocast_context(dtype, str(device)):
                chosen, rejected = pair_rewards(model, x.to(device), batch.to(device))
            pairs = chosen.shape[0]
            totals["val_loss"] += bradley_terry_loss(chosen, rejected).sum().item()
            for key, value in reward_metrics(chosen, rejected).items():
                totals[f"val_{key}"] += value * pairs
            n += pairs
    model.train(was_training)
    return {k: v / max(n, 1) for k, v in totals.items()}


def run_reward(opts: AlignOptions, say=print) -> TrainResult:
    """Train a reward model as ``opts`` says (or resume the run in ``opts.out``); returns the loop's result."""
    from scratchlm.finetune.run import _describe_memory, _train_config
    from scratchlm.heads import load_head, save_head_model

    o, resume_dir = settle_options(opts, "reward", REWARD_DEFAULTS, say)
    check_data(o)
    out = Path(opts.out)
    if resume_dir is None:
        clear_run_dir(out, opts.force, "reward")
    llm, train_pairs, val_pairs = load_model_and_pairs(o, say)
    body, tokenizer, template = llm.model, llm.tokenizer, llm.template

    n_base = body.num_parameters()
    settings = fingerprint = None
    if o["method"] == "lora":
        settings, fingerprint = add_lora(body, o)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(o["seed"])  # the head's initial weights follow --seed
    model = HeadModel(body, n_outputs=1, task="reward")
    torch.random.set_rng_state(generator_state)
    if settings is None:
        trainable = None
        model.requires_grad_(True)
    else:
        trainable = [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n
                     or n.startswith("head.")]
    _describe_memory(model, n_base, say)

    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    batches = PreferenceBatches(train_pairs, o["batch_size"], pad_id, o["seed"], shift=False)
    val = fixed_pair_batches(val_pairs, o["batch_size"], pad_id, shift=False) if val_pairs else None
    config = _train_config({**o, "lr": o["lr"] if o["lr"] is not None else DEFAULT_LR[o["method"]]},
                           batches.batches_per_epoch)
    epochs = config.max_steps * config.grad_accum_steps / batches.batches_per_epoch
    say(f"reward model ({o['method']}): {config.max_steps} steps of {o['batch_size']} x {config.grad_accum_steps} "
        f"pairs ({epochs:.2f} epochs), lr {config.lr:g}")
    o.update(max_steps=config.max_steps, lr=config.lr, warmup_steps=config.warmup_steps,
             eval_interval=config.eval_interval)
    record_run(out, "reward", o)

    def save_model(directory: Path) -> None:
        save_head_model(directory, model, tokenizer, template.source, lora=settings, base_model=str(o["model"]),
                        fingerprint=fingerprint)

    def load_model(directory: Path) -> None:
        if settings is not None:
            from scratchlm.finetune.peft import load_adapter

            load_adapter(body, directory, merge=False, check_base=False)
        else:
            from scratchlm.formats.checkpoint import load_model_dir

            _, state = load_model_dir(directory)
            body.load_state_dict(state, strict=not body.config.tie_embeddings)
        load_head(model, directory)

    stash = MetricStash()

    def loss_fn(forward, x, batch):
        chosen, rejected = pair_rewards(forward, x, batch)
        stash.add(**reward_metrics(chosen.detach(), rejected.detach()))
        return bradley_terry_loss(chosen, rejected).mean()

    def evaluate_fn(m, val_batches):
        return evaluate_rewards(m, val_batches, o["dtype"])

    reporter = AlignReport(out, opts.progress, stash)
    result = train(model, config, batches, val, trainable=trainable, out_dir=out, save_model=save_model,
                   resume_from=resume_dir, reporter=reporter, load_model=load_model, loss_fn=loss_fn,
                   evaluate_fn=evaluate_fn)
    evals = [r for r in result.history if "val_accuracy" in r]
    summary = f"; held-out preference accuracy {evals[-1]['val_accuracy']:.1%}" if evals else ""
    say(f"done: {result.step} steps in {result.elapsed:.0f} s{summary}")
    final = out / ("best" if val is not None else "last")
    say(f"wrote {out}: reward model {final}; {out / 'last'} continues with `scratchlm align reward --out {out} "
        f"--resume`; curves {out / 'loss.png'}, {out / 'metrics.jsonl'}\nuse it: scratchlm align score {final} "
        f"--data FILE")
    return result


# ---- scoring ------------------------------------------------------------------------------------------------
def score_file(directory: str | Path, data: str | Path, batch_size: int = 8, base: str | None = None,
               progress: bool = False) -> list[dict]:
    """Rewards of every line of ``data`` under the reward model in ``directory``.

    A preference line (``prompt``, ``chosen``, ``rejected``) gives ``{"line", "chosen", "rejected"}``; a
    conversation (``messages``, or ``prompt`` + ``completion``) gives ``{"line", "reward"}``.
    """
    from scratchlm.align.data import render_pair, to_preference
    from scratchlm.finetune.data import read_jsonl, render_example, to_messages
    from scratchlm.heads import load_head_model
    from scratchlm.progress import bar

    model, llm = load_head_model(directory, base=base)
    rows: list[tuple[int, str, list[int]]] = []  # (line, field, token ids)
    for number, record in read_jsonl(data):
        where = f"{data}, line {number}"
        if "chosen" in record or "rejected" in record:
            pair = render_pair(*to_preference(record, where), llm.template, llm.tokenizer, where)
            rows += [(number, "chosen", pair.prompt + pair.chosen), (number, "rejected", pair.prompt + pair.rejected)]
        else:
            rows.append((number, "reward", render_example(to_messages(record, where), llm.template, llm.tokenizer,
                                                          where).ids))
    context = model.config.context_length
    pad_id = llm.tokenizer.eos_id if llm.tokenizer.eos_id is not None else 0
    scores = []
    starts = range(0, len(rows), batch_size)
    with torch.no_grad():
        for start in bar(starts, "scoring", progress, total=len(starts), unit="batch"):
            chunk = [ids[:context] for _, _, ids in rows[start:start + batch_size]]
            x = torch.full((len(chunk), max(map(len, chunk))), pad_id, dtype=torch.long)
            for i, ids in enumerate(chunk):
                x[i, : len(ids)] = torch.tensor(ids)
            scores += model(x, torch.tensor([len(ids) for ids in chunk])).squeeze(-1).tolist()
    results: dict[int, dict] = {}
    for (number, field, _), value in zip(rows, scores):
        results.setdefault(number, {"line": number})[field] = value
    return list(results.values())
