"""PPO's pieces against values worked out by hand, rollouts against a plain forward pass, and ``align ppo``
end to end on a tiny model (it learns, the reference is the adapter-free model, and resuming is exact)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_llm
from scratchlm.align import ppo
from scratchlm.align.rl import RLOptions, run_rl
from scratchlm.align.rollout import Prompt, make_batch, response_hidden, score_batch, token_logprobs
from scratchlm.errors import ConfigError, DataError, TrainingError
from scratchlm.formats.checkpoint import save_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gae_equals_the_recursion_worked_by_hand():
    # Row 0: three real tokens; row 1: two real tokens and padding whose reward and value must not count.
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 7.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    g, lam = 0.9, 0.8
    # delta_t = r_t + g V_{t+1} - V_t (V after the last real token is 0); A_t = delta_t + g lam A_{t+1}
    a02 = 2.0 - 0.3
    a01 = (0.0 + g * 0.3 - 0.2) + g * lam * a02
    a00 = (1.0 + g * 0.2 - 0.1) + g * lam * a01
    a11 = 1.0 - 0.5
    a10 = (0.5 + g * 0.5 - 0.4) + g * lam * a11
    advantages, returns = ppo.gae(rewards, values, mask, gamma=g, lam=lam)
    expected = torch.tensor([[a00, a01, a02], [a10, a11, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)
    assert a00 == pytest.approx(2.01168)


def test_clipped_policy_loss_equals_hand_values():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]]))  # ratios 1.5, 0.5, 1.5, 0.5
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, stats = ppo.policy_loss(new, old, advantages, mask, clip=0.2)
    # max(-A r, -A clip(r)): 1.5,+1 -> max(-1.5, -1.2); 0.5,+1 -> max(-0.5, -0.8); 1.5,-1 -> max(1.5, 1.2);
    # 0.5,-1 -> max(0.5, 0.8)
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert stats["clipfrac"] == pytest.approx(0.5)  # the clipped term decided tokens 1 and 4
    masked, _ = ppo.policy_loss(new, old, advantages, torch.tensor([[1.0, 1.0, 0.0, 0.0]]), clip=0.2)
    assert float(masked) == pytest.approx((-1.2 - 0.5) / 2)


def test_clipped_value_loss_equals_hand_values():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]])
    loss, stats = ppo.value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 1: max((1-2)^2, (0.7-2)^2) = 1.69; token 2: max(0^2, (0.3-0)^2) = 0.09
    assert float(loss) == pytest.approx(0.5 * (1.69 + 0.09) / 2)
    assert stats["vf_clipfrac"] == pytest.approx(1.0)


def test_kl_estimators_equal_hand_values_and_k1_k3_are_unbiased():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert float(ppo.kl_estimate(logp, ref, "k1")) == pytest.approx(math.log(2))
    assert float(ppo.kl_estimate(logp, ref, "k2")) == pytest.approx(0.5 * math.log(2) ** 2)
    assert float(ppo.kl_estimate(logp, ref, "k3")) == pytest.approx((0.5 - 1) + math.log(2))
    with pytest.raises(ValueError):
        ppo.kl_estimate(logp, ref, "k9")
    # Tokens drawn from p: the means of k1 and k3 approach KL(p || q); k3 is never negative.
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    exact = float((p * (p / q).log()).sum())
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for kind in ("k1", "k3"):
        estimate = ppo.kl_estimate(p.log()[tokens], q.log()[tokens], kind)
        assert float(estimate.mean()) == pytest.approx(exact, abs=0.01)
    assert bool((ppo.kl_estimate(p.log()[tokens], q.log()[tokens], "k3") >= 0).all())


def test_token_rewards_pay_the_kl_per_token_and_the_score_on_the_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = ppo.token_rewards(torch.tensor([3.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 3.0], [-0.1, -1.0, 0.0]]))


def test_masked_whiten_uses_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (real - real.mean()) / real.std()
    out = ppo.masked_whiten(x, mask, eps=0.0)
    torch.testing.assert_close(out[mask.bool()], expected)
    assert float(out[0, 2]) == 0.0
    kept = ppo.masked_whiten(x, mask, shift_mean=False, eps=0.0)
    torch.testing.assert_close(kept[mask.bool()], expected + real.mean())


# ---- rollouts -----------------------------------------------------------------------------------------------
def test_response_logprobs_equal_a_plain_forward_pass():
    llm = tiny_llm("llama", seed=1)
    prompts = [Prompt("a", [], [5, 6, 7], 1), Prompt("b", [], [8, 9], 2)]
    responses = [[10, 11], [12, 13, 14]]
    batch = make_batch(prompts, responses, ["", ""], pad_id=0)
    with torch.no_grad():
        got = token_logprobs(llm.model, response_hidden(llm.model, batch), batch, temperature=0.7)
        for row, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p.ids + r])
            logp = torch.log_softmax(llm.model(ids)[0].float() / 0.7, -1)
            want = torch.stack([logp[len(p.ids) - 1 + j, t] for j, t in enumerate(r)])
            torch.testing.assert_close(got[row, :len(r)], want, rtol=1e-5, atol=1e-5)
    assert batch.mask.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    assert float(got[0, 2]) == 0.0


# ---- the command ------------------------------------------------------------------------------------------------
WORDS = ["apple", "river", "stone", "cloud", "amber", "lemon", "tiger", "maple", "ocean", "piano", "candle", "forest"]
# A reward the tiny random model can learn in a few steps: 1 when the completion starts with an ASCII character
# (a byte below 128), about half of the random model's first tokens.
REWARD_SOURCE = ("def ascii_start(prompt, completion):\n"
                 "    return float(completion[:1] < '\\x80' and completion != '')\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    llm = tiny_llm("llama", seed=0)
    with torch.no_grad():  # sharper next-token distributions than the random init's near-uniform ones, which the
        llm.model.lm_head.weight.mul_(10.0)  # final norm keeps LoRA from moving much in a few steps
    save_model_dir(root / "tiny", llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say {w}"}) + "\n" for w in WORDS))
    (root / "rewards.py").write_text(REWARD_SOURCE)
    return root


def options(setup, out, **changes) -> RLOptions:
    base = dict(algorithm="ppo", model=str(setup / "tiny"), prompts=str(setup / "prompts.jsonl"),
                reward=f"{setup / 'rewards.py'}:ascii_start", out=str(out), max_steps=4, batch_size=8,
                max_new_tokens=2, minibatch_size=8, ppo_epochs=2, lr=3e-2, kl_coef=0.01, eval_interval=2, rank=4,
                val_fraction=0.25, progress=False)
    return RLOptions(**{**base, **changes})


def quiet(*args, **kwargs):
    pass


def test_ppo_resume_is_exact(setup, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    # Three runs here; drawing reward.png (seconds on a busy machine) is checked by the test below, not here.
    monkeypatch.setattr("scratchlm.align.rl_report.plot_rewards", lambda *args: None)

    straight = run_rl(options(setup, tmp_path / "a"), say=quiet)
    run_rl(options(setup, tmp_path / "b", max_steps=2), say=quiet)
    resumed = run_rl(RLOptions(algorithm="ppo", out=str(tmp_path / "b"), max_steps=4, resume=True, progress=False),
                     say=quiet)
    for name in ("adapter_model.safetensors", "head.safetensors"):
        a, b = load_file(tmp_path / "a" / "last" / name), load_file(tmp_path / "b" / "last" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    steps = [r for r in straight.history if "reward" in r]
    assert [r["reward"] for r in steps[2:]] == [r["reward"] for r in resumed.history if "reward" in r]
    assert straight.val_reward == resumed.val_reward
    assert json.loads((tmp_path / "a" / "run.json").read_text())["command"] == "align ppo"


def ascii_start_probability(llm, prompts_file) -> float:
    """The model's mean probability of starting its answer with an ASCII byte, over the prompts: what the reward
    pays for, without the noise of sampling."""
    from scratchlm.align.rollout import read_prompts

    prompts = read_prompts(prompts_file, llm, 256)
    with torch.no_grad():
        return sum(float(torch.softmax(llm.model(torch.tensor([p.ids]))[0, -1], -1)[:128].sum())
                   for p in prompts) / len(prompts)


def test_ppo_starts_at_the_reference_and_raises_the_reward(setup, tmp_path):
    from scratchlm.llm import LLM

    result = run_rl(options(setup, tmp_path / "run", max_steps=4, lr=1e-2), say=quiet)
    steps = [r for r in result.history if "reward" in r]
    assert steps[0]["kl"] == 0.0  # B = 0 at step 0: the policy is its reference exactly
    assert result.val_kl > 0.0
    before = ascii_start_probability(LLM.load(setup / "tiny"), setup / "prompts.jsonl")
    after = ascii_start_probability(LLM.load(setup / "tiny", adapter=tmp_path / "run" / "last"),
                                    setup / "prompts.jsonl")
    assert after > before + 0.2, (before, after)  # measured: 0.57 -> 0.92
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "kl", "pg_loss", "vf_loss", "clipfrac", "approx_kl"} <= set(metrics[1])
    assert (tmp_path / "run" / "reward.png").stat().st_size > 0


def test_reference_logprobs_are_the_model_without_its_adapter():
    from scratchlm.finetune.lora import LoraSettings, apply_lora

    llm = tiny_llm("llama", seed=2)
    batch = make_batch([Prompt("a", [], [5, 6, 7], 1)], [[10, 11, 12]], [""], pad_id=0)
    with torch.no_grad():
        plain = token_logprobs(llm.model, response_hidden(llm.model, batch), batch)
    apply_lora(llm.model, LoraSettings(rank=2, alpha=4), seed=0)
    for name, p in llm.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter: the policy moved away from the base
    scored = score_batch(llm, batch, {"dtype": "float32", "temperature": 1.0, "kl_coef": 0.1})
    torch.testing.assert_close(scored["ref_logprobs"], plain)
    assert not torch.allclose(scored["logprobs"], plain)


def test_rl_errors_are_one_line_and_say_what_to_do(setup, tmp_path):
    with pytest.raises(ConfigError, match="module:function"):
        run_rl(options(setup, tmp_path / "x", reward="no_such_thing"), say=quiet)
    with pytest.raises(ConfigError, match="num-generations must be at least 2"):
        run_rl(options(setup, tmp_path / "x", algorithm="grpo", group_size=1), say=quiet)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match="line 2"):
        run_rl(options(setup, tmp_path / "x", prompts=str(bad)), say=quiet)
    run_rl(options(setup, tmp_path / "y", max_steps=1), say=quiet)
    with pytest.raises(TrainingError, match="--resume"):
        run_rl(options(setup, tmp_path / "y", max_steps=1), say=quiet)
    with pytest.raises(TrainingError, match="only max_steps"):
        run_rl(RLOptions(algorithm="ppo", out=str(tmp_path / "y"), lr=1.0, resume=True, progress=False), say=quiet)


def test_a_reward_model_directory_scores_as_align_score_does_and_drives_ppo(setup, tmp_path):
    from scratchlm.align.reward import score_file
    from scratchlm.align.rewards import load_reward
    from scratchlm.heads import HeadModel, save_head_model
    from scratchlm.llm import LLM

    llm = LLM.load(setup / "tiny")
    torch.manual_seed(0)
    save_head_model(tmp_path / "rm", HeadModel(llm.model, 1), llm.tokenizer, llm.template.source)
    pairs = [("Say apple", "apple"), ("Say river", "a long answer about rivers")]
    data = tmp_path / "conversations.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    expected = [row["reward"] for row in score_file(tmp_path / "rm", data)]
    got = load_reward(str(tmp_path / "rm"))([p for p, _ in pairs], [c for _, c in pairs])
    assert got == pytest.approx(expected, abs=1e-5)
    result = run_rl(options(setup, tmp_path / "ppo", reward=str(tmp_path / "rm"), max_steps=1), say=quiet)
    assert result.step == 1 and math.isfinite(result.history[0]["reward"])
