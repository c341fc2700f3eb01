"""The optimizer choice: each of ours takes the same step as torch's own, and per-group learning-rate multiples
(discriminative fine-tuning) are what the loop applies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scratchlm.errors import ConfigError
from scratchlm.train.optim import OPTIMIZERS, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def reference(name: str, model: nn.Module, lr: float, wd: float) -> torch.optim.Optimizer:
    """torch's optimizer built by hand with the same groups: decay on matrices, none on vectors."""
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": wd},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.8)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=0.8)
    return torch.optim.Adafactor(groups, lr=lr)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_takes_torchs_own_steps(name):
    ours_model, theirs_model = small_model(), small_model()
    ours = make_optimizer(ours_model.named_parameters(), 0.01, 0.1, (0.9, 0.95), fused=False, name=name, momentum=0.8)
    theirs = reference(name, theirs_model, 0.01, 0.1)
    assert type(ours) is type(theirs)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for model, opt in ((ours_model, ours), (theirs_model, theirs)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    start = small_model()
    for (name_, a), b, s in zip(ours_model.named_parameters(), theirs_model.parameters(), start.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, s), name_  # it did move


def test_fused_adamw_matches_the_plain_one():
    a, b = small_model(), small_model()
    fused = make_optimizer(a.named_parameters(), 0.01, 0.1, (0.9, 0.95), fused=True)
    plain = make_optimizer(b.named_parameters(), 0.01, 0.1, (0.9, 0.95), fused=False)
    x = torch.randn(8, 6)
    for model, opt in ((a, fused), (b, plain)):
        model(x).pow(2).mean().backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_lr_scale_puts_parameters_in_groups_with_their_rate():
    model = small_model()
    scale = {"0.weight": 0.25, "0.bias": 0.25, "1.weight": 0.5, "1.bias": 0.5, "2.weight": 1.0, "2.bias": 1.0}
    opt = make_optimizer(model.named_parameters(), 0.1, 0.1, (0.9, 0.95), name="sgd", lr_scale=scale.__getitem__)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        group = by_param[id(p)]
        assert group["lr_scale"] == scale[name] and group["lr"] == pytest.approx(0.1 * scale[name])
        assert group["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="adamw, sgd, rmsprop, adafactor"):
        make_optimizer(small_model().named_parameters(), 0.1, 0.0, (0.9, 0.95), name="lion")
