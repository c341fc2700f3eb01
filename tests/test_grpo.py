"""GRPO's advantages and loss against hand-computed values, the checkable rewards, and ``align grpo`` on a tiny
model (it raises what the reward pays for)."""

from __future__ import annotations

import math

import pytest
import torch

from scratchlm.align import grpo
from scratchlm.align.rewards import final_number_reward, load_reward
from scratchlm.errors import ConfigError, DataError
from test_ppo import ascii_start_probability, options, quiet, setup  # noqa: F401 (setup is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_group_advantages_equal_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    std = math.sqrt((4 * 0.25) / 3)  # unbiased std of 1, 0, 0, 1
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]) / torch.tensor([std + 1e-4] * 4 + [1.0] * 4)
    torch.testing.assert_close(grpo.group_advantages(rewards, 4), expected)
    torch.testing.assert_close(grpo.group_advantages(rewards, 4, scale=False),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError):
        grpo.group_advantages(rewards, 3)


def test_grpo_loss_and_gradient_equal_hand_values():
    # Two completions of 2 and 3 tokens; on-policy (ratio 1), so the loss is -mean_i A_i and the gradient
    # of token t of completion i is -A_i / (|o_i| * N).
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([1.0, -2.0])
    loss, stats = grpo.grpo_loss(logprobs, logprobs.detach(), None, advantages, mask)
    assert float(loss.detach()) == pytest.approx(-(1.0 - 2.0) / 2)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 4, -1 / 4, 0.0], [2 / 6, 2 / 6, 2 / 6]]))
    assert stats["clipfrac"] == 0.0
    # With a reference: + beta * k3 per token; k3 of log ratio -0.5 is exp(-0.5) - 1 + 0.5.
    ref = torch.tensor([[-1.5, -2.5, 0.0], [-1.0, -1.0, -1.0]])
    with_kl, stats = grpo.grpo_loss(logprobs.detach(), logprobs.detach(), ref, advantages, mask, kl_coef=0.1)
    k3 = math.exp(-0.5) - 1 + 0.5
    assert float(with_kl) == pytest.approx(0.5 + 0.1 * k3)
    assert stats["kl"] == pytest.approx(k3)
    # Off-policy: ratio 1.5 with A > 0 is clipped at 1.2.
    clipped, stats = grpo.grpo_loss(torch.log(torch.tensor([[1.5]])), torch.zeros(1, 1), None, torch.tensor([1.0]),
                                    torch.ones(1, 1))
    assert float(clipped) == pytest.approx(-1.2)
    assert stats["clipfrac"] == 1.0


def test_final_number_reward_checks_the_arithmetic():
    prompt = "What is 17 + 25 * 3? Answer with the number only."
    assert final_number_reward(prompt, "92") == 1.0
    assert final_number_reward(prompt, "17 + 25 * 3 = 17 + 75 = 92.") == 1.0
    assert final_number_reward(prompt, "126") == 0.0
    assert final_number_reward(prompt, "I don't know") == 0.0
    assert final_number_reward([{"role": "user", "content": "Compute 50 - 8."}], "It is 42") == 1.0
    assert final_number_reward("Hello", "42") == 0.0


def test_reward_functions_load_by_name_and_must_return_numbers(tmp_path):
    reward = load_reward("scratchlm.align.rewards:final_number_reward")
    assert reward(["What is 2 + 3?", "What is 2 + 3?"], ["5", "6"]) == [1.0, 0.0]
    (tmp_path / "bad.py").write_text("def text(prompt, completion):\n    return 'good'\n")
    with pytest.raises(DataError, match="finite number"):
        load_reward(f"{tmp_path / 'bad.py'}:text")(["p"], ["c"])
    with pytest.raises(ConfigError, match="no function"):
        load_reward("scratchlm.align.rewards:nothing_here")


def test_grpo_raises_what_the_reward_pays_for(setup, tmp_path):  # noqa: F811
    from scratchlm.llm import LLM

    result = run(setup, tmp_path)
    steps = [r for r in result.history if "reward" in r]
    assert steps[0]["kl"] == 0.0 and {"loss", "clipfrac", "reward_std"} <= set(steps[0])
    before = ascii_start_probability(LLM.load(setup / "tiny"), setup / "prompts.jsonl")
    after = ascii_start_probability(LLM.load(setup / "tiny", adapter=tmp_path / "run" / "last"),
                                    setup / "prompts.jsonl")
    assert after > before + 0.2, (before, after)  # measured: 0.57 -> 0.92


def run(setup, tmp_path):  # noqa: F811
    from scratchlm.align.rl import run_rl

    return run_rl(options(setup, tmp_path / "run", algorithm="grpo", max_steps=8, batch_size=2, group_size=4,
                          eval_interval=8), say=quiet)


def test_align_grpo_from_the_command_line(setup, tmp_path, capsys):  # noqa: F811
    from scratchlm.cli import main

    code = main(["align", "grpo", str(setup / "tiny"), "--prompts", str(setup / "prompts.jsonl"), "--reward",
                 f"{setup / 'rewards.py'}:ascii_start", "--out", str(tmp_path / "cli"), "--max-steps", "1",
                 "--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "2", "--kl-coef", "0",
                 "--no-progress"])
    assert code == 0
    assert "held-out reward" in capsys.readouterr().out
    assert main(["align", "ppo", "--out", str(tmp_path / "cli"), "--resume"]) == 2  # a GRPO run, not a PPO one
    assert "align grpo" in capsys.readouterr().err
