"""DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023): learn from preferences with no reward model, no sampling.

DPO's insight (section 4): the policy that maximises a reward under a KL leash to the reference is
pi*(y|x) ~ pi_ref(y|x) exp(r(x, y) / beta), so the reward is a log-ratio, r = beta log(pi(y|x) / pi_ref(y|x))
(+ a term that cancels in a pair). Put that into the Bradley-Terry preference model and the reward model's loss
becomes a loss on the policy itself (eq. 7):

    h      = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))    chosen y_w, rejected y_l
    L_DPO  = -log sigmoid(beta h)
    L_IPO  = (h' - 1 / (2 beta))^2      (Azar et al. eq. 17; h' with each log-ratio divided by its response's
                                         token count, as TRL does, so beta means the same for long answers)

``log pi(y|x)`` sums the log-probabilities of the response tokens only. The implicit rewards
``beta (log pi - log pi_ref)`` of the chosen and rejected answers, their margin and the preference accuracy
(chosen reward above rejected) are what a run reports. At step 0 the policy is the reference: h = 0, the loss
is log 2 and every margin 0.

The reference log-probabilities are computed once, before training, by the same model with its LoRA adapter
switched off (with full fine-tuning, by the model before its first step), and cached in ``OUT``: no second
model in memory. The adapter written to ``OUT/best`` is a PEFT adapter, as ``finetune``'s.

    scratchlm align dpo smollm2-135m-instruct --data prefs.jsonl --beta 0.1 --out runs/dpo
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scratchlm.align.data import (
    IGNORE,
    PairTargets,
    PreferenceBatches,
    collate_pairs,
    fixed_pair_batches,
)
from scratchlm.align.run import (
    DEFAULTS,
    AlignOptions,
    AlignReport,
    MetricStash,
    adapters_disabled,
    add_lora,
    check_data,
    clear_run_dir,
    load_model_and_pairs,
    record_run,
    settle_options,
)
from scratchlm.errors import ConfigError
from scratchlm.files import atomic_write_bytes
from scratchlm.train.loop import TrainResult, autocast_context, train

LOSSES = ("sigmoid", "ipo")
DPO_DEFAULTS = {**DEFAULTS, "beta": 0.1, "loss": "sigmoid"}
DEFAULT_LR = {"lora": 5e-5, "full": 5e-7}
REFERENCE_FILE = "reference_logps.safetensors"


def sequence_logps(forward: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(response | prompt) per row [R]: the sum of the log-probabilities of the targets that are not -100.

    Only the response positions are projected onto the vocabulary (as ``finetune.run.sft_loss``).
    """
    keep = targets != IGNORE
    if hasattr(forward, "hidden_states"):
        logits = forward.logits(forward.hidden_states(input_ids)[keep]).float()  # (N, V)
    else:  # a wrapped model (compiled): the plain forward
        logits = forward(input_ids)[keep].float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(1, targets[keep][:, None]).squeeze(1)  # (N,)
    rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[keep]
    return torch.zeros(targets.shape[0], device=token_logps.device).index_add(0, rows, token_logps)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss: str = "sigmoid",
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] and the implicit rewards of the chosen and rejected answers [B] (see the module
    docstring); ``loss="ipo"`` needs the responses' token counts."""
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    elif loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the IPO loss needs the token counts of the responses")
        h = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"unknown DPO loss {loss!r}; choose one of {', '.join(LOSSES)}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def pair_loss(forward: torch.nn.Module, x: torch.Tensor, batch: PairTargets, beta: float, loss: str
              ) -> tuple[torch.Tensor, dict]:
    """Mean DPO/IPO loss of a batch (chosen rows, then rejected rows) and its metrics (means over pairs)."""
    logps = sequence_logps(forward, x, batch.targets)
    policy_chosen, policy_rejected = logps.chunk(2)
    ref_chosen, ref_rejected = batch.ref_logps.chunk(2)
    tokens_chosen, tokens_rejected = (batch.targets != IGNORE).sum(1).chunk(2)
    losses, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss,
                                        tokens_chosen, tokens_rejected)
    metrics = {"rewards_chosen": chosen.mean().item(), "rewards_rejected": rejected.mean().item(),
               "margin": (chosen - rejected).mean().item(), "accuracy": (chosen > rejected).float().mean().item()}
    return losses.mean(), metrics


@torch.no_grad()
def reference_logps(model: torch.nn.Module, pairs: list, batch_size: int, pad_id: int, dtype: str = "float32",
                    progress: bool = False) -> torch.Tensor:
    """log pi_ref of each pair's (chosen, rejected) response [N, 2], with ``model``'s adapters switched off."""
    from scratchlm.progress import bar

    was_training = model.training
    model.eval()
    out = torch.zeros(len(pairs), 2)
    device = next(model.parameters()).device
    starts = range(0, len(pairs), batch_size)
    with adapters_disabled(model):
        for start in bar(starts, "reference log-probs", progress, total=len(starts), unit="batch"):
            chunk = pairs[start:start + batch_size]
            x, batch = collate_pairs(chunk, pad_id)
            with autocast_context(dtype, str(device)):
                logps = sequence_logps(model, x.to(device), batch.targets.to(device)).float().cpu()
            out[start:start + len(chunk)] = torch.stack(logps.chunk(2), dim=1)
    model.train(was_training)
    return out


def _cached_reference(out: Path, model, train_pairs, val_pairs, o: dict, pad_id: int, say, progress: bool):
    """The reference log-probabilities of the training and validation pairs: read from ``OUT`` when they were
    computed for this very model, data and settings (a resumed run), else computed now and written there."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save

    from scratchlm.align.run import data_fingerprints

    key = json.dumps({**{k: o[k] for k in ("model", "max_length", "too_long", "val_fraction", "seed", "dtype")},
                      **data_fingerprints(o)}, sort_keys=True, default=str)
    path = out / REFERENCE_FILE
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                cached = {name: f.get_tensor(name) for name in f.keys()}
                if cached["train"].shape[0] == len(train_pairs) and cached["val"].shape[0] == len(val_pairs):
                    return cached["train"], cached["val"]
    start = time.perf_counter()
    ref_train = reference_logps(model, train_pairs, o["batch_size"], pad_id, o["dtype"], progress)
    ref_val = reference_logps(model, val_pairs, o["batch_size"], pad_id, o["dtype"], progress)
    say(f"reference log-probabilities of {len(train_pairs) + len(val_pairs)} pairs in "
        f"{time.perf_counter() - start:.1f} s (adapter off; cached in {path})")
    atomic_write_bytes(path, save({"train": ref_train.contiguous(), "val": ref_val.contiguous()},
                                  metadata={"key": key}))
    return ref_train, ref_val


def evaluate_pairs(model: torch.nn.Module, batches: list, beta: float, loss: str, dtype: str) -> dict:
    """Validation loss, implicit rewards, margin and preference accuracy over fixed batches (pair-weighted)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = {"val_loss": 0.0, "val_rewards_chosen": 0.0, "val_rewards_rejected": 0.0, "val_margin": 0.0,
              "val_accuracy": 0.0}
    n = 0
    with torch.no_grad():
        for x, batch in batches:
            pairs = x.shape[0] // 2
            with autocast_context(dtype, str(device)):
                value, metrics = pair_loss(model, x.to(device), batch.to(device), beta, loss)
            totals["val_loss"] += value.item() * pairs
            for key, v in metrics.items():
                totals[f"val_{key}"] += v * pairs
            n += pairs
    model.train(was_training)
    return {k: v / max(n, 1) for k, v in totals.items()}


def run_dpo(opts: AlignOptions, say=print) -> TrainResult:
    """DPO or IPO as ``opts`` says (or resume the run in ``opts.out``); returns the loop's result."""
    from scratchlm.finetune.run import HF_REPOS, _describe_memory, _train_config
    from scratchlm.formats.checkpoint import save_model_dir

    o, resume_dir = settle_options(opts, "dpo", DPO_DEFAULTS, say)
    if o["loss"] not in LOSSES:
        raise ConfigError(f"unknown --loss {o['loss']!r}; choose one of {', '.join(LOSSES)}")
    if not o["beta"] > 0:
        raise ConfigError(f"--beta must be positive, got {o['beta']}")
    check_data(o)
    out = Path(opts.out)
    if resume_dir is None:
        clear_run_dir(out, opts.force, "dpo")
    llm, train_pairs, val_pairs = load_model_and_pairs(o, say)
    model, tokenizer, template = llm.model, llm.tokenizer, llm.template

    n_base = model.num_parameters()
    settings = fingerprint = None
    if o["method"] == "full":
        trainable = None
        model.requires_grad_(True)
    else:
        settings, fingerprint = add_lora(model, o)
        trainable = [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    _describe_memory(model, n_base, say)

    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    ref_train, ref_val = _cached_reference(out, model, train_pairs, val_pairs, o, pad_id, say, opts.progress)
    batches = PreferenceBatches(train_pairs, o["batch_size"], pad_id, o["seed"], ref_logps=ref_train)
    val = fixed_pair_batches(val_pairs, o["batch_size"], pad_id, ref_logps=ref_val) if val_pairs else None
    config = _train_config({**o, "lr": o["lr"] if o["lr"] is not None else DEFAULT_LR[o["method"]]},
                           batches.batches_per_epoch)
    epochs = config.max_steps * config.grad_accum_steps / batches.batches_per_epoch
    say(f"dpo ({o['loss']}, beta {o['beta']:g}, {o['method']}): {config.max_steps} steps of {o['batch_size']} x "
        f"{config.grad_accum_steps} pairs ({epochs:.2f} epochs), lr {config.lr:g}")
    o.update(max_steps=config.max_steps, lr=config.lr, warmup_steps=config.warmup_steps,
             eval_interval=config.eval_interval)
    record_run(out, "dpo", o)

    base_name = HF_REPOS.get(str(o["model"]), str(o["model"]))

    def save_model(directory: Path) -> None:
        if settings is None:
            save_model_dir(directory, model.config, model.canonical_state_dict(), tokenizer, template.source)
        else:
            from scratchlm.finetune.peft import save_adapter

            save_adapter(directory, model, settings, base_name, fingerprint)

    def load_model(directory: Path) -> None:
        from scratchlm.finetune.peft import load_adapter

        load_adapter(model, directory, merge=False, check_base=False)

    stash = MetricStash()

    def loss_fn(forward, x, batch):
        value, metrics = pair_loss(forward, x, batch, o["beta"], o["loss"])
        stash.add(**metrics)
        return value

    def evaluate_fn(m, val_batches):
        return evaluate_pairs(m, val_batches, o["beta"], o["loss"], o["dtype"])

    reporter = AlignReport(out, opts.progress, stash)
    result = train(model, config, batches, val, trainable=trainable, out_dir=out, save_model=save_model,
                   resume_from=resume_dir, reporter=reporter, load_model=load_model if settings else None,
                   loss_fn=loss_fn, evaluate_fn=evaluate_fn)
    evals = [r for r in result.history if "val_accuracy" in r]
    summary = f"; validation preference accuracy {evals[-1]['val_accuracy']:.1%}" if evals else ""
    say(f"done: {result.step} steps in {result.elapsed:.0f} s{summary}")
    final = out / ("best" if val is not None else "last")
    what = "adapter (PEFT format)" if settings else "model"
    use = (f"scratchlm chat {o['model']} --adapter {final}   |   scratchlm merge {o['model']} {final} --out merged"
           if settings else f"scratchlm chat {final}")
    say(f"wrote {out}: {what} {final}; {out / 'last'} continues with `scratchlm align dpo --out {out} --resume`; "
        f"curves {out / 'loss.png'}, {out / 'metrics.jsonl'}\nuse it: {use}")
    return result

