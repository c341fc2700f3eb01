"""RL moves behaviour: GRPO on checkable arithmetic, PPO against a learned reward model (issue 19, items 6b, 6c).

    python benchmarks/align_rl.py grpo [--steps 20] [--record]
    python benchmarks/align_rl.py ppo [--reward-model DIR] [--steps 10] [--ppo-epochs 2] [--rm-steps 30] [--record]

grpo: SmolLM2-135M-Instruct, LoRA, ``scripts/make_arithmetic.py`` prompts, reward
``scratchlm.align.rewards:final_number_reward`` (1 when the last number of the answer is right). Held-out figures
on the 64 test prompts, before and after: the mean reward of one sampled answer per prompt (the training sampler,
fixed seeds) and greedy accuracy.

ppo: a reward model trained with ``align reward`` on ``scripts/make_preferences.py`` (answers opening with
"Ahoy!" preferred; or ``--reward-model`` to reuse one), then PPO against it on the preference prompts. Held-out
figures on the test prompts: the reward model's mean score of sampled and of greedy answers, the share of greedy
answers in the style, and the KL to the reference (summed over a completion, nats).

Both print wall time per phase; the issue's target is each demonstration within 15 minutes on 2 cores.

Defaults (2026-12-02): GRPO 20 steps and PPO 15 steps with KL coefficient 0.1. The 2026-12-01 runs at 40 / 30 steps
took 28 / 35 minutes; GRPO's held-out reward had made most of its gain by step 20, and PPO at KL coefficient 0.05
drifted to 11 nats/completion from the reference while finding phrasings the reward model likes without the style
(reward hacking): a shorter run on a tighter leash is the fairer demonstration. PPO at 15 steps, 4 epochs and a
60-step reward model then used 40 CPU-minutes (20 minutes of an idle 2-core machine at best): the PPO defaults are
now 10 steps of 2 epochs each and a 30-step reward model, to fit the 15-minute target.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"


def greedy_answers(model_name: str, adapter: Path | None, prompts: list[str], max_new_tokens: int) -> list[str]:
    from scratchlm.llm import LLM

    llm = LLM.load(model_name, dtype="float32", adapter=adapter)
    return llm.chat([[{"role": "user", "content": p}] for p in prompts], temperature=0, max_new_tokens=max_new_tokens)


def run_grpo(args, work: Path) -> tuple[str, list[tuple]]:
    from scratchlm.align.rewards import final_number_reward
    from scratchlm.align.rl import RLOptions, run_rl

    data = work / "arithmetic"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_arithmetic.py"), "--out", str(data)], check=True)
    test = [json.loads(line)["prompt"] for line in (data / "test.jsonl").read_text().splitlines()]
    t0 = time.perf_counter()
    base = greedy_answers(MODEL, None, test, args.max_new_tokens)
    t_base = time.perf_counter() - t0
    opts = RLOptions(algorithm="grpo", model=MODEL, prompts=str(data / "train.jsonl"),
                     val_prompts=str(data / "test.jsonl"), reward="scratchlm.align.rewards:final_number_reward",
                     out=str(work / "grpo"), max_steps=args.steps,
                     batch_size=args.batch_size, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, lr=args.lr, kl_coef=args.kl_coef, eval_interval=args.eval_interval,
                     seed=args.seed, force=True, progress=False)
    t0 = time.perf_counter()
    result = run_rl(opts)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    after = greedy_answers(MODEL, work / "grpo" / "last", test, args.max_new_tokens)
    t_after = time.perf_counter() - t0

    def accuracy(answers):
        return sum(final_number_reward(p, a) for p, a in zip(test, answers)) / len(test)

    rows = [("held-out reward, sampled (mean of 64)", result.val_reward_start, result.val_reward),
            ("held-out greedy accuracy", accuracy(base), accuracy(after)),
            ("KL to the reference (nats/completion)", 0.0, result.val_kl)]
    settings = (f"{args.steps} steps x {args.batch_size} prompts x {args.group_size} samples, temperature "
                f"{args.temperature}, {args.max_new_tokens} new tokens, lr {args.lr:g}, KL coef {args.kl_coef:g}, LoRA "
                f"rank 8 on all projections; GRPO {t_train:.0f} s (with {1 + args.steps // args.eval_interval} "
                f"held-out evaluations), greedy checks {t_base:.0f} + {t_after:.0f} s")
    examples = [f"`{p}` -> before {b!r}, after {a!r}" for p, b, a in list(zip(test, base, after))[:3]]
    return settings + "\n\nExamples (greedy):\n" + "\n".join(f"- {e}" for e in examples), rows


def run_ppo(args, work: Path) -> tuple[str, list[tuple]]:
    from scratchlm.align.rewards import model_reward
    from scratchlm.align.rl import RLOptions, run_rl

    prefs = work / "prefs"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_preferences.py"), "--out", str(prefs)], check=True)
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_preferences import follows_style

    t_rm = 0.0
    reward_model = Path(args.reward_model) if args.reward_model else work / "rm" / "best"
    if not args.reward_model:
        from scratchlm.align.reward import run_reward
        from scratchlm.align.run import AlignOptions

        t0 = time.perf_counter()
        run_reward(AlignOptions(model=MODEL, data=str(prefs / "train.jsonl"), out=str(work / "rm"),
                                max_steps=args.rm_steps, batch_size=8, lr=1e-4, seed=args.seed, force=True,
                                progress=False))
        t_rm = time.perf_counter() - t0
    for split in ("train", "test"):  # PPO reads prompts only
        rows = [json.loads(line) for line in (prefs / f"{split}.jsonl").read_text().splitlines()]
        (work / f"prompts_{split}.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    test = [json.loads(line)["prompt"] for line in (work / "prompts_test.jsonl").read_text().splitlines()]
    test = test[:args.max_eval_prompts]
    opts = RLOptions(algorithm="ppo", model=MODEL, prompts=str(work / "prompts_train.jsonl"),
                     val_prompts=str(work / "prompts_test.jsonl"), max_eval_prompts=args.max_eval_prompts,
                     reward=str(reward_model), out=str(work / "ppo"), max_steps=args.steps,
                     batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     lr=args.lr, kl_coef=args.kl_coef, ppo_epochs=args.ppo_epochs, eval_interval=args.eval_interval,
                     seed=args.seed, force=True, progress=False)
    t0 = time.perf_counter()
    result = run_rl(opts)
    t_train = time.perf_counter() - t0
    reward = model_reward(reward_model)
    t0 = time.perf_counter()
    base = greedy_answers(MODEL, None, test, args.max_new_tokens)
    after = greedy_answers(MODEL, work / "ppo" / "last", test, args.max_new_tokens)
    t_greedy = time.perf_counter() - t0

    def mean(xs):
        return sum(xs) / len(xs)

    rows = [("held-out reward-model score, sampled", result.val_reward_start, result.val_reward),
            ("held-out reward-model score, greedy", mean(reward(test, base)), mean(reward(test, after))),
            ("greedy answers in the style (opens with Ahoy!)", mean([follows_style(a) for a in base]),
             mean([follows_style(a) for a in after])),
            ("KL to the reference (nats/completion)", 0.0, result.val_kl)]
    rm = f"given: {reward_model}" if args.reward_model else f"trained {args.rm_steps} steps in {t_rm:.0f} s"
    settings = (f"{args.steps} steps x {args.batch_size} prompts, {args.max_new_tokens} new tokens, temperature "
                f"{args.temperature}, lr {args.lr:g}, KL coef {args.kl_coef:g}, {args.ppo_epochs} PPO epochs, "
                f"minibatch 8; reward model {rm}; "
                f"PPO {t_train:.0f} s; greedy checks {t_greedy:.0f} s")
    examples = [f"`{p}` -> before {b!r}, after {a!r}" for p, b, a in list(zip(test, base, after))[:3]]
    return settings + "\n\nExamples (greedy):\n" + "\n".join(f"- {e}" for e in examples), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", choices=["grpo", "ppo"])
    parser.add_argument("--steps", type=int, default=None, help="RL steps (grpo 20, ppo 10)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per step (grpo 4, ppo 16)")
    parser.add_argument("--num-generations", dest="group_size", type=int, default=8, help="GRPO samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="grpo 24, ppo 32")
    parser.add_argument("--temperature", type=float, default=None, help="grpo 0.7, ppo 1.0")
    parser.add_argument("--lr", type=float, default=None, help="grpo 2e-4, ppo 1e-4")
    parser.add_argument("--kl-coef", type=float, default=None, help="grpo 0.04, ppo 0.1")
    parser.add_argument("--eval-interval", type=int, default=None)
    parser.add_argument("--max-eval-prompts", type=int, default=64)
    parser.add_argument("--reward-model", default=None, help="ppo: a reward model directory to reuse")
    parser.add_argument("--rm-steps", type=int, default=30, help="ppo: reward-model training steps")
    parser.add_argument("--ppo-epochs", type=int, default=2, help="ppo: passes over each batch of rollouts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/scratchlm-align-rl", help="scratch directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = parser.parse_args()
    defaults = {"grpo": dict(steps=20, batch_size=4, max_new_tokens=24, temperature=0.7, lr=2e-4, kl_coef=0.04),
                "ppo": dict(steps=10, batch_size=16, max_new_tokens=32, temperature=1.0, lr=1e-4, kl_coef=0.1)}
    for key, value in defaults[args.demo].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.eval_interval = args.eval_interval or max(1, args.steps // 2)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    settings, rows = (run_grpo if args.demo == "grpo" else run_ppo)(args, work)
    total = time.perf_counter() - start
    table = ["| held-out measure | before | after |", "|---|---|---|"]
    table += [f"| {name} | {before:.3f} | {after:.3f} |" for name, before, after in rows]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss = usage.ru_maxrss / 1024
    # CPU seconds of this process: on a shared machine the wall time says more about the neighbours than about us;
    # CPU time / threads is the wall time an idle machine would need if both threads were always busy (a lower bound).
    cpu_min = (usage.ru_utime + usage.ru_stime) / 60
    title = {"grpo": "GRPO on checkable arithmetic", "ppo": "PPO against the Ahoy! reward model"}[args.demo]
    from common import machine

    text = (f"\n## {title}, SmolLM2-135M-Instruct ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)\n\n"
            f"Machine: {machine()}; load average after the run {load}; torch {torch.__version__}, {args.threads} "
            f"threads, float32. Total wall time {total / 60:.1f} min (target: 15 min), CPU time {cpu_min:.1f} min "
            f"(/ {args.threads} threads = {cpu_min / args.threads:.1f} min), peak RSS {rss:.0f} MiB.\n"
            f"Command: `python benchmarks/align_rl.py {' '.join(sys.argv[1:])}`\n\n{settings}\n\n" + "\n".join(table)
            + "\n")
    print(text)
    if args.record:
        from common import append_results

        append_results(text)


if __name__ == "__main__":
    main()
