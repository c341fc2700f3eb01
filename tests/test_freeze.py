"""Freezing, gradual unfreezing and discriminative learning rates (finetune/freeze.py) in the training loop."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_llm
from scratchlm.errors import ConfigError
from scratchlm.finetune.freeze import TransferControls, layer_group
from scratchlm.train.loop import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def batches():
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randint(0, 256, (4, 16), generator=g)
        yield x, torch.roll(x, -1, 1)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def config(steps: int, **changes) -> TrainConfig:
    return TrainConfig(**{**dict(max_steps=steps, batch_size=4, lr=1e-2, min_lr=1e-2, warmup_steps=0,
                                 eval_interval=100, weight_decay=0.0, grad_clip=0.0), **changes})


def test_layer_groups_follow_the_names():
    assert layer_group("tok_embeddings.weight", 2) == 0
    assert layer_group("blocks.0.attn.q_proj.weight", 2) == 1
    assert layer_group("body.blocks.1.mlp.up_proj.lora_A.weight", 2) == 2
    assert layer_group("final_norm.weight", 2) == 3
    assert layer_group("head.weight", 2) == 3
    controls = TransferControls(2, layer_lr_decay=0.5)
    assert [controls.lr_scale(n) for n in ("lm_head.weight", "blocks.1.attn.o_proj.weight",
                                           "blocks.0.mlp.down_proj.weight", "tok_embeddings.weight")] == \
        [1.0, 0.5, 0.25, 0.125]
    with pytest.raises(ConfigError, match="freeze-layers"):
        TransferControls(2, freeze_layers=3)
    with pytest.raises(ConfigError, match="layer-lr-decay"):
        TransferControls(2, layer_lr_decay=0.0)


def test_frozen_layers_stay_bit_identical():
    model = tiny_llm("llama", seed=0).model
    before = snapshot(model)
    controls = TransferControls(model.config.n_layers, freeze_layers=1)
    trainable = controls.trainable([n for n, _ in model.named_parameters()])
    train(model, config(3), batches(), trainable=trainable)
    after = snapshot(model)
    for name in before:
        frozen = name.startswith(("tok_embeddings.", "blocks.0."))
        assert torch.equal(before[name], after[name]) == frozen, name


def test_gradual_unfreezing_thaws_one_block_at_a_time_from_the_top():
    model = tiny_llm("llama", seed=0).model  # 2 blocks: groups 0 (embeddings), 1, 2, 3 (final norm, head)
    controls = TransferControls(model.config.n_layers, unfreeze_every=2)
    assert [controls.lowest_unfrozen(s) for s in range(7)] == [3, 3, 2, 2, 1, 1, 0]
    names = [n for n, _ in model.named_parameters()]
    moved_by = {}
    for steps in (2, 4):
        fresh = copy.deepcopy(model)
        before = snapshot(fresh)
        train(fresh, config(steps), batches(), trainable=names, before_step=controls.before_step(fresh, names))
        after = snapshot(fresh)
        moved_by[steps] = {n for n in names if not torch.equal(before[n], after[n])}
    assert moved_by[2] == {n for n in names if layer_group(n, 2) == 3}  # the top only
    assert moved_by[4] == {n for n in names if layer_group(n, 2) >= 2}  # and the last block


def test_discriminative_rates_scale_each_groups_step():
    model = tiny_llm("llama", seed=0).model
    reference = copy.deepcopy(model)
    x, y = next(batches())
    from scratchlm.train.loop import lm_loss

    lm_loss(reference(x), y).backward()
    grads = {n: p.grad for n, p in reference.named_parameters()}
    before = snapshot(model)
    controls = TransferControls(model.config.n_layers, layer_lr_decay=0.5)
    # Plain SGD, constant rate: each parameter moves by exactly -lr * scale * gradient.
    train(model, config(1, optimizer="sgd", momentum=0.0, lr=0.1, min_lr=0.1), iter([(x, y)]),
          lr_scale=controls.lr_scale)
    for name, p in model.named_parameters():
        expected = before[name] - 0.1 * controls.lr_scale(name) * grads[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
