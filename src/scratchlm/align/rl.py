"""``scratchlm align ppo`` and ``scratchlm align grpo``: the RL run around ``ppo.py`` and ``grpo.py``.

    result = run_rl(RLOptions(algorithm="grpo", model="smollm2-135m-instruct", prompts="train.jsonl",
                              reward="scratchlm.align.rewards:final_number_reward", out="runs/grpo"))

One step (``--max-steps`` of them):

    prompts    <- the next --batch-size prompts (a seeded shuffle per pass over the file)
    rollouts   <- --num-generations completions of each, sampled by the policy (LoRA on) with one seed each
    scores     <- the reward (a reward-model directory or module:function) on each (prompt, completion)
    old, ref   <- log-probabilities under the policy and under the reference (the same model, LoRA off)
    PPO:  values from the value head, per-token KL penalty, whitening, GAE (ppo.advantages_and_returns)
    GRPO: advantages normalised within each prompt's group (grpo.group_advantages)
    repeat --ppo-epochs times, over shuffled minibatches: the clipped loss, backward, clip, AdamW step

The policy is a LoRA adapter on the base model, so the reference costs no memory. PPO's value head is a
``heads.HeadModel`` head on the policy's own hidden states (one forward gives logits and values). Every
``--eval-interval`` steps (and at step 0, the baseline) the held-out prompts are answered once each with the
training sampler and fixed seeds: ``val_reward`` is their mean reward, ``val_kl`` the mean summed KL to the
reference per completion (an unbiased estimate of the sequence-level KL).

Files in ``out`` as ``finetune`` writes them: ``last/`` and ``best/`` (PEFT adapters; PPO's also hold the value
head), ``metrics.jsonl``, ``reward.png``, ``run.json``. Rollout seeds and prompt order follow from the step
number, so ``--resume`` continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from scratchlm.align import grpo, ppo, rollout
from scratchlm.align.rl_defaults import ALGORITHMS, DEFAULTS
from scratchlm.align.rollout import Prompt, read_prompts
from scratchlm.errors import ConfigError, TrainingError
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.record import RUN_FILE, describe_changes, merge_given, read_record, write_record

CHANGEABLE = ("max_steps", "epochs", "eval_interval")


@dataclass
class RLOptions:
    """Everything ``scratchlm align ppo|grpo`` can be told; None: the algorithm's default (``DEFAULTS``), or the
    recorded value with ``resume=True``, which needs only ``algorithm`` and ``out``."""

    algorithm: str = "grpo"
    model: str | None = None
    prompts: str | Path | None = None  # JSONL of {"prompt": ...}
    reward: str | None = None  # a reward-model directory, module:function or file.py:function
    out: str | Path | None = None
    val_prompts: str | Path | None = None
    val_fraction: float | None = None
    epochs: float | None = None  # passes over the prompts (default 1 when max_steps is not given)
    max_steps: int | None = None  # rollout batches
    batch_size: int | None = None  # prompts per step
    group_size: int | None = None  # completions per prompt
    ppo_epochs: int | None = None  # passes over each batch of rollouts
    minibatch_size: int | None = None  # completions per optimizer step
    grad_accum_steps: int | None = None  # micro-batches per minibatch (memory)
    lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float | None = None
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    targets: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_prompt_length: int | None = None
    kl_coef: float | None = None
    clip: float | None = None
    value_clip: float | None = None
    vf_coef: float | None = None
    gamma: float | None = None
    lam: float | None = None
    whiten_rewards: bool | None = None
    eval_interval: int | None = None
    max_eval_prompts: int | None = None
    dtype: str | None = None
    activation_checkpointing: bool | None = None
    seed: int | None = None
    resume: bool = False
    force: bool = False
    progress: bool = True


OPTION_NAMES = tuple(f.name for f in fields(RLOptions) if f.name not in ("algorithm", "out", "resume", "force",
                                                                         "progress"))


def _given(opts: RLOptions) -> dict:
    given = {name: getattr(opts, name) for name in OPTION_NAMES}
    for name in ("prompts", "val_prompts"):
        if given[name] is not None:
            given[name] = str(Path(given[name]).expanduser().resolve())
    for name in ("model", "reward"):
        if given[name] is not None and Path(given[name]).expanduser().exists():
            given[name] = str(Path(given[name]).expanduser().resolve())
    return given


def _settle(opts: RLOptions, say) -> tuple[dict, Path | None]:
    """The options of this run (defaults filled in, or the recorded run's on --resume) and the checkpoint to
    resume from."""
    if opts.algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {opts.algorithm!r}; choose {' or '.join(ALGORITHMS)}")
    if opts.out is None:
        raise ConfigError("give --out, the directory for the run's checkpoints and curves")
    out, command = Path(opts.out), f"align {opts.algorithm}"
    given = _given(opts)
    if given["epochs"] is not None and given["max_steps"] is not None:
        raise ConfigError("give --epochs or --max-steps, not both")
    if not opts.resume:
        if given["model"] is None or given["prompts"] is None or given["reward"] is None:
            raise ConfigError("give the base model, --prompts and --reward (only --resume takes them from run.json)")
        return {**given, **{k: v for k, v in DEFAULTS[opts.algorithm].items() if given.get(k) is None}}, None
    existing = ckpt.resolve_checkpoint(out / "last")
    record = read_record(out, command)
    if existing is None or record is None:
        raise TrainingError(f"nothing to resume in {out}: run `scratchlm {command}` without --resume first")
    recorded = record["options"]
    if given["epochs"] is not None:
        given, recorded = {**given, "max_steps": None}, {**recorded, "max_steps": None}
    elif given["max_steps"] is not None:
        recorded = {**recorded, "epochs": None}
    options = merge_given(out, command, recorded, given, CHANGEABLE)
    changes = describe_changes(record["options"], options)
    say(f"resuming {out} from {existing} at step {ckpt.read_trainer_state(existing)['step']}"
        + (f"; changed: {changes}" if changes else ""))
    return options, existing


def _check(o: dict, algorithm: str) -> None:
    positive = ("batch_size", "group_size", "ppo_epochs", "minibatch_size", "grad_accum_steps", "max_new_tokens",
                "max_prompt_length", "max_eval_prompts")
    for name in positive:
        if not isinstance(o[name], int) or o[name] < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {o[name]!r}")
    if algorithm == "grpo" and o["group_size"] < 2:
        raise ConfigError("GRPO compares completions of the same prompt: --num-generations must be at least 2")
    if not (o["lr"] > 0 and o["kl_coef"] >= 0 and o["clip"] > 0 and o["temperature"] > 0):
        raise ConfigError("need --lr > 0, --kl-coef >= 0, --clip > 0 and --temperature > 0 (RL samples; greedy "
                          "completions of a prompt would all be the same)")
    if o["epochs"] is not None and o["epochs"] <= 0:
        raise ConfigError(f"--epochs must be positive, got {o['epochs']}")
    if o["dtype"] not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype must be float32 or bfloat16, got {o['dtype']!r}")


@dataclass
class RLResult:
    """What the run did: steps, the last training reward, and the held-out reward before and after."""

    step: int
    reward: float | None
    val_reward_start: float | None
    val_reward: float | None
    val_kl: float | None
    best_val_reward: float | None
    elapsed: float
    history: list[dict]


def run_rl(opts: RLOptions, say=print) -> RLResult:
    """Train a LoRA policy with PPO or GRPO as ``opts`` says (or resume the run in ``opts.out``)."""
    from scratchlm.align.rewards import load_reward
    from scratchlm.finetune.lora import LoraSettings, apply_lora, parse_targets
    from scratchlm.finetune.peft import base_fingerprint, check_peft_layout
    from scratchlm.llm import LLM
    from scratchlm.sampling import SamplingParams
    from scratchlm.train.optim import lr_at, make_optimizer
    from scratchlm.train.run import clear_out_dir

    algorithm, out = opts.algorithm, Path(opts.out) if opts.out is not None else None
    o, resume_dir = _settle(opts, say)
    _check(o, algorithm)
    reward = load_reward(o["reward"])  # a bad --reward fails before the model loads
    if resume_dir is None:
        existing = ckpt.resolve_checkpoint(out / "last")
        if existing is not None and not opts.force:
            raise TrainingError(f"{out} already holds a run (checkpoint at step "
                                f"{ckpt.read_trainer_state(existing).get('step')}): continue it with `scratchlm align "
                                f"{algorithm} --out {out} --resume`, replace it with --force, or choose another --out")
        clear_out_dir(out, True, "RL")
        out.mkdir(parents=True, exist_ok=True)
        (out / "reward.png").unlink(missing_ok=True)
    start = time.perf_counter()
    llm = LLM.load(o["model"], dequantize=True, compile=False)
    model = llm.model
    check_peft_layout(model.config)
    say(f"loaded {llm.name} in {time.perf_counter() - start:.1f} s: {model.num_parameters() / 1e6:.1f}M parameters")
    prompts = read_prompts(o["prompts"], llm, o["max_prompt_length"])
    if o["val_prompts"] is not None:
        train_prompts, val_prompts = prompts, read_prompts(o["val_prompts"], llm, o["max_prompt_length"])
    else:
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(o["seed"])).tolist()
        n_val = min(int(round(len(prompts) * o["val_fraction"])), len(prompts) - 1)
        val_prompts, train_prompts = [prompts[i] for i in order[:n_val]], [prompts[i] for i in order[n_val:]]
    val_prompts = val_prompts[:o["max_eval_prompts"]]
    if o["max_steps"] is None:
        o["max_steps"] = max(1, math.ceil((o["epochs"] or 1.0) * len(train_prompts) / o["batch_size"]))
    o["eval_interval"] = o["eval_interval"] or max(1, o["max_steps"] // 5)
    say(f"{len(train_prompts)} training and {len(val_prompts)} held-out prompts; {o['max_steps']} steps of "
        f"{o['batch_size']} prompts x {o['group_size']} completions")
    write_record(out, f"align {algorithm}", o)

    fingerprint = base_fingerprint(model)
    settings = LoraSettings(o["rank"], o["alpha"], o["dropout"], parse_targets(o["targets"], model.config.mlp))
    apply_lora(model, settings, seed=o["seed"])
    model.gradient_checkpointing = bool(o["activation_checkpointing"])
    trained: torch.nn.Module = model
    value_model = None
    if algorithm == "ppo":
        from scratchlm.heads import HeadModel

        torch.manual_seed(o["seed"])
        value_model = trained = HeadModel(model, 1, task="value")  # the value head reads the policy's states
    names = {p: n for n, p in trained.named_parameters()}
    params = [(n, p) for p, n in names.items() if p.requires_grad]  # the LoRA matrices (and the value head)
    optimizer = make_optimizer(params, o["lr"], o["weight_decay"], (0.9, 0.999))
    trained.train()
    sampling = SamplingParams(max_new_tokens=o["max_new_tokens"], temperature=o["temperature"], top_k=o["top_k"],
                              top_p=o["top_p"])
    base_name = str(o["model"])

    def save_model(directory: Path) -> None:
        if value_model is not None:
            from scratchlm.heads import save_head_model

            save_head_model(directory, value_model, lora=settings, base_model=base_name, fingerprint=fingerprint)
        else:
            from scratchlm.finetune.peft import save_adapter
            from scratchlm.finetune.run import HF_REPOS

            save_adapter(directory, model, settings, HF_REPOS.get(base_name, base_name), fingerprint)

    state = {"step": 0, "best_val_reward": None, "best_step": None}
    if resume_dir is not None:
        state = _resume(resume_dir, model, value_model, optimizer, names, state)
    from scratchlm.align.rl_report import RLReport

    report = RLReport(out, algorithm, o["max_steps"], opts.progress, say)
    report.start(state["step"])
    result = RLResult(state["step"], None, None, None, None, state["best_val_reward"], 0.0, [])
    started = time.perf_counter()

    def evaluate() -> dict:
        stats = rollout.evaluate_prompts(llm, val_prompts, reward, sampling, o)
        return {"step": state["step"], **stats}

    def save(kind: str, with_optimizer: bool) -> None:
        from scratchlm.train.optim import optimizer_tensors

        trainer_state = {**state, "rng": [ckpt.capture_rng()], "algorithm": algorithm}
        ckpt.write_checkpoint(out / kind, save_model, optimizer_tensors(optimizer, names) if with_optimizer else None,
                              trainer_state)

    if state["step"] == 0 and val_prompts:
        record = evaluate()
        result.val_reward_start = record["val_reward"]
        report.on_eval(record)
    while state["step"] < o["max_steps"]:
        t0 = time.perf_counter()
        for group in optimizer.param_groups:  # linear warm-up, then constant (RL recipes rarely decay)
            group["lr"] = lr_at(state["step"], o["lr"], o["lr"], o["warmup_steps"], o["max_steps"])
        batch_prompts = prompts_for_step(train_prompts, state["step"], o["batch_size"], o["seed"])
        record = rl_step(llm, value_model, optimizer, batch_prompts, reward, sampling, o, algorithm, state["step"])
        state["step"] += 1
        record.update(step=state["step"], step_time=time.perf_counter() - t0)
        result.history.append(record)
        result.reward = record["reward"]
        report.on_step(record)
        done = state["step"] >= o["max_steps"]
        if val_prompts and (state["step"] % o["eval_interval"] == 0 or done):
            record = evaluate()
            best = state["best_val_reward"]
            record["best"] = best is None or record["val_reward"] > best
            if record["best"]:
                state.update(best_val_reward=record["val_reward"], best_step=state["step"])
                save("best", with_optimizer=False)
            save("last", with_optimizer=True)
            result.history.append(record)
            result.val_reward, result.val_kl = record["val_reward"], record["val_kl"]
            report.on_eval(record)
        elif done:
            save("last", with_optimizer=True)
    report.end()
    result.step, result.best_val_reward = state["step"], state["best_val_reward"]
    result.elapsed = time.perf_counter() - started
    final = out / ("best" if val_prompts else "last")
    say(f"done: {result.step} steps in {result.elapsed:.0f} s; adapter (PEFT format) {final}; curves "
        f"{out / 'reward.png'}, {out / 'metrics.jsonl'}; options {out / RUN_FILE}\n"
        f"use it: scratchlm chat {o['model']} --adapter {final}")
    return result


def prompts_for_step(prompts: list[Prompt], step: int, batch_size: int, seed: int) -> list[Prompt]:
    """The prompts of step ``step``: consecutive slices of a seeded shuffle, a new shuffle for every pass."""
    n, out = len(prompts), []
    for k in range(step * batch_size, (step + 1) * batch_size):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + k // n))
        out.append(prompts[int(order[k % n])])
    return out


def _seeds(seed: int, step: int, count: int) -> list[int]:
    return [(seed * 1_000_003 + step * 10_007 + i) % 2**62 for i in range(count)]


def rl_step(llm, value_model, optimizer, prompts: list[Prompt], reward, sampling, o: dict, algorithm: str,
            step: int) -> dict:
    """One PPO or GRPO step: rollouts, rewards, advantages, then ``ppo_epochs`` passes of minibatch updates."""
    from scratchlm.train.loop import autocast_context

    model = llm.model
    t0 = time.perf_counter()
    batch = rollout.sample_rollouts(llm, prompts, o["group_size"], sampling, _seeds(o["seed"], step, len(prompts)
                                                                             * o["group_size"]))
    t_sample = time.perf_counter() - t0
    scores = torch.tensor(reward([p.raw for p in batch.prompts], batch.texts), dtype=torch.float32)
    scored = rollout.score_batch(llm, batch, o, value_model)
    mask = batch.mask
    record = {"reward": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
              "response_length": float(mask.sum(1).mean())}
    if "ref_logprobs" in scored:
        kl = ppo.kl_estimate(scored["logprobs"], scored["ref_logprobs"], "k1") * mask
        record["kl"] = float(kl.sum(1).mean())
    if algorithm == "ppo":
        targets = ppo.advantages_and_returns(scores, scored["logprobs"], scored["ref_logprobs"], scored["values"],
                                             mask, ppo.PPOSettings(o["kl_coef"], o["gamma"], o["lam"], o["clip"],
                                                                   o["value_clip"], o["vf_coef"],
                                                                   o["whiten_rewards"]))
        advantages = targets["advantages"]
    else:
        advantages = grpo.group_advantages(scores, o["group_size"])
    totals: dict[str, float] = {}
    updates = 0
    generator = torch.Generator().manual_seed(o["seed"] * 7_919 + step)
    trained = value_model if value_model is not None else model
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for _ in range(o["ppo_epochs"]):
        order = torch.randperm(len(batch), generator=generator)
        for mb_start in range(0, len(batch), o["minibatch_size"]):
            rows = order[mb_start:mb_start + o["minibatch_size"]]
            micro_size = math.ceil(len(rows) / o["grad_accum_steps"])
            for m_start in range(0, len(rows), micro_size):
                micro = rows[m_start:m_start + micro_size]
                part = batch.select(micro)
                R = part.mask.shape[1]
                with autocast_context(o["dtype"], "cpu"):
                    hidden = rollout.response_hidden(model, part)
                    logprobs = rollout.token_logprobs(model, hidden, part, o["temperature"])
                    old = scored["logprobs"][micro, :R]
                    ref = scored["ref_logprobs"][micro, :R] if "ref_logprobs" in scored else None
                    if algorithm == "ppo":
                        values = value_model.head(hidden).squeeze(-1).float()
                        pg, pg_stats = ppo.policy_loss(logprobs, old, advantages[micro, :R], part.mask, o["clip"])
                        vf, vf_stats = ppo.value_loss(values, scored["values"][micro, :R],
                                                      targets["returns"][micro, :R], part.mask, o["value_clip"])
                        loss = pg + o["vf_coef"] * vf
                        stats = {"pg_loss": float(pg.detach()), "vf_loss": float(vf.detach()), **pg_stats, **vf_stats}
                    else:
                        loss, stats = grpo.grpo_loss(logprobs, old, ref, advantages[micro], part.mask, o["clip"],
                                                     o["kl_coef"])
                        stats.pop("kl", None)
                (loss * len(micro) / len(rows)).backward()
                for k, v in {"loss": float(loss.detach()), **stats}.items():
                    totals[k] = totals.get(k, 0.0) + v * len(micro) / len(rows)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
            if not math.isfinite(grad_norm):
                raise TrainingError(f"the gradient became {grad_norm} at step {step + 1}: lower --lr")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
    trained.train()
    record.update({k: v / updates for k, v in totals.items()})
    record.update(grad_norm=grad_norm, sample_time=t_sample, lr=optimizer.param_groups[0]["lr"])
    return record


def _resume(directory: Path, model, value_model, optimizer, names, state: dict) -> dict:
    from scratchlm.finetune.peft import load_adapter
    from scratchlm.train.optim import load_optimizer_tensors

    saved = ckpt.read_trainer_state(directory)
    load_adapter(model, directory, merge=False, check_base=False)
    if value_model is not None:
        from scratchlm.heads import load_head

        load_head(value_model, directory)
    load_optimizer_tensors(optimizer, names, ckpt.read_optimizer_tensors(directory))
    ckpt.restore_rng(saved["rng"][0])
    return {k: saved[k] for k in state}

