"""LoRA layers, merging, QLoRA's NF4 base (scratchlm.finetune.{lora,nf4}) and LoRA training in the shared loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import tiny_llm
from scratchlm.errors import ConfigError
from scratchlm.finetune.lora import (
    LoRALinear,
    LoraSettings,
    apply_lora,
    lora_layers,
    lora_parameter_names,
    merge_lora,
    parse_targets,
)
from scratchlm.finetune.nf4 import (
    LEVELS,
    NF4Embedding,
    NF4Linear,
    dequantize_absmax,
    dequantize_nf4,
    frozen_weight_bytes,
    quantize_base,
    quantize_nf4,
)
from scratchlm.train.loop import TrainConfig, train

ALL = ("q", "k", "v", "o", "gate", "up", "down")


def ids(batch=2, length=24, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)


class Batches:
    """Fixed random batches (targets: next ids, first half masked) for the shared loop."""

    def __init__(self, n=4):
        self.i, self.data = 0, [ids(4, 20, seed=s) for s in range(n)]

    def __next__(self):
        x = self.data[self.i % len(self.data)]
        self.i += 1
        y = torch.roll(x, -1, dims=1)
        y[:, :10] = -100
        return x, y

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


# ---- LoRA -----------------------------------------------------------------------------------------------------
def test_lora_at_step_zero_is_exactly_the_base_model():
    llm = tiny_llm("llama")
    x = ids()
    with torch.no_grad():
        before = llm.model(x)
        apply_lora(llm.model, LoraSettings(rank=4, alpha=8, targets=ALL), seed=0)
        after = llm.model(x)
    assert torch.equal(before, after)
    assert all(torch.count_nonzero(layer.lora_B.weight) == 0 for layer in lora_layers(llm.model).values())
    assert all(torch.count_nonzero(layer.lora_A.weight) > 0 for layer in lora_layers(llm.model).values())


def test_a_lora_layer_adds_alpha_over_r_times_b_a_x():
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=True)
    layer = LoRALinear(copy.deepcopy(base), rank=4, alpha=6.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16)
    expected = base(x) + (6.0 / 4) * x @ layer.lora_A.weight.t() @ layer.lora_B.weight.t()
    torch.testing.assert_close(layer(x), expected)
    rs = LoRALinear(copy.deepcopy(base), rank=4, alpha=6.0, use_rslora=True)
    assert rs.scaling == pytest.approx(6.0 / math.sqrt(4))


def test_lora_dropout_acts_on_the_update_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 32), rank=4, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(8, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_only_the_lora_matrices_train_and_the_base_stays_frozen():
    llm = tiny_llm("llama")
    base = {k: v.clone() for k, v in llm.model.state_dict().items()}
    apply_lora(llm.model, LoraSettings(rank=4, alpha=8, targets=("q", "v")), seed=0)
    names = lora_parameter_names(llm.model)
    assert len(names) == 2 * 2 * llm.config.n_layers  # A and B, two targets, every layer
    train(llm.model, TrainConfig(max_steps=3, batch_size=4, lr=1e-2, warmup_steps=0, eval_interval=10),
          Batches(), trainable=names)
    merged = merge_lora(copy.deepcopy(llm.model))
    for name, value in llm.model.state_dict().items():
        if ".lora_" in name:
            continue
        canonical = name.replace(".base.", ".")
        assert torch.equal(value, base[canonical]), name  # no base weight moved
    changed = [n for n, v in merged.state_dict().items() if not torch.equal(v, base[n])]
    assert changed and all(".attn.q_proj." in n or ".attn.v_proj." in n for n in changed)


def test_merging_gives_the_same_function_as_the_adapter():
    llm = tiny_llm("llama")
    apply_lora(llm.model, LoraSettings(rank=4, alpha=8, targets=ALL), seed=0)
    randomize_b(llm.model)
    x = ids()
    with torch.no_grad():
        adapted = llm.model(x)
        merge_lora(llm.model)
        merged = llm.model(x)
    assert not lora_layers(llm.model)
    assert set(llm.model.state_dict()) == set(tiny_llm("llama").model.state_dict())  # canonical names again
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_unknown_targets_list_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown LoRA target 'qkv'; valid targets for this model: "
                                          r"q, k, v, o, gate, up, down"):
        parse_targets("q,qkv")
    with pytest.raises(ConfigError, match=r"'gate'.*valid targets for this model: q, k, v, o, up, down"):
        parse_targets(["gate"], mlp="gelu")
    assert parse_targets("q_proj, v ,down_proj") == ("q", "v", "down")


def test_lora_settings_are_validated():
    with pytest.raises(ConfigError, match="rank"):
        LoraSettings(rank=0)
    with pytest.raises(ConfigError, match="dropout"):
        LoraSettings(dropout=1.0)


# ---- NF4 / QLoRA ------------------------------------------------------------------------------------------------
def test_nf4_levels_are_the_qlora_paper_values():
    # QLoRA appendix E / bitsandbytes' NF4 table (rounded to 4 decimals there, to 1e-6 here).
    expected = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
    torch.testing.assert_close(LEVELS, torch.tensor(expected), atol=1e-6, rtol=0)


def test_nf4_round_trip_costs_4_127_bits_per_weight_and_keeps_weights_close():
    w = torch.randn(256, 512) * 0.02
    q = quantize_nf4(w)
    bits = 8 * sum(t.numel() * t.element_size() for t in q.values()) / w.numel()
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=0.01)  # QLoRA section 3: 4.127 bits
    w_hat = dequantize_nf4(q, w.shape)
    assert ((w_hat - w).norm() / w.norm()).item() < 0.12
    # Each weight is a level times its block's (double-quantized) absmax.
    absmax = dequantize_absmax(q["absmax_q"], q["absmax_scale"], q["absmax_mean"])
    exact = w.reshape(-1, 64).abs().amax(1)
    assert ((absmax - exact).abs() / exact).max() < 0.05
    ratios = (w_hat.reshape(-1, 64) / absmax[:, None]).reshape(-1)
    assert torch.isclose(ratios[:, None], LEVELS[None, :], atol=1e-5).any(dim=1).all()


def test_nf4_linear_gives_input_gradients_of_the_dequantized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True)
    q = NF4Linear.from_linear(linear)
    reference = nn.Linear(64, 48)
    reference.weight.data, reference.bias.data = q.weight_float(), linear.bias.data.clone()
    x = torch.randn(2, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad = torch.randn(2, 5, 48)
    q(x).backward(grad)
    reference(x_ref).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert not any(p.requires_grad for p in q.parameters())
    ids_ = torch.tensor([[0, 3], [47, 3]])
    emb = NF4Embedding(linear.weight)
    torch.testing.assert_close(emb(ids_), q.weight_float()[ids_])


def test_qlora_base_is_close_to_float_and_under_a_third_of_its_memory():
    llm = tiny_llm("llama", d_model=128, d_ff=256, n_heads=4, n_kv_heads=2)
    x = ids()
    with torch.no_grad():
        ref = llm.model(x)
        float_bytes = frozen_weight_bytes(llm.model)
        quantize_base(llm.model)
        apply_lora(llm.model, LoraSettings(rank=4, alpha=8, targets=ALL), seed=0)
        got = llm.model(x)
    nf4_bytes = frozen_weight_bytes(llm.model)
    assert nf4_bytes < 0.2 * float_bytes
    # 4-bit weights move the logits by a few percent of their spread, not by whole units.
    assert ((got - ref).norm() / ref.norm()).item() < 0.25
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.5


def test_qlora_trains_only_the_adapter():
    llm = tiny_llm("llama")
    quantize_base(llm.model)
    apply_lora(llm.model, LoraSettings(rank=4, alpha=8, targets=ALL), seed=0)
    frozen = {k: v.clone() for k, v in llm.model.state_dict().items() if ".lora_" not in k}
    result = train(llm.model, TrainConfig(max_steps=12, batch_size=4, lr=2e-2, warmup_steps=0, eval_interval=100),
                   Batches(1), trainable=lora_parameter_names(llm.model))
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert losses[-1] < 0.9 * losses[0]
    for k, v in llm.model.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, frozen[k]), k
    merge_lora(llm.model)  # the NF4 base dequantizes into float layers holding the merged weights
    assert isinstance(llm.model.blocks[0].attn.q_proj, nn.Linear)
