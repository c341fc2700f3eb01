"""Quantization-aware training (quant/qat.py, ``finetune --qat``): the forward trains with exactly the weights
that ``scratchlm quantize --to int4`` later stores."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_llm
from scratchlm.cli import main
from scratchlm.errors import ConfigError
from scratchlm.finetune.lora import LoraSettings, apply_lora
from scratchlm.finetune.run import FinetuneOptions, run_finetune
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.llm import LLM
from scratchlm.quant.int4 import Int4Linear
from scratchlm.quant.int8 import dequantize_int8
from scratchlm.quant.qat import QATEmbedding, QATLinear, QATLoRALinear, fake_quantize_int4, prepare_qat

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [{"messages": [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w}]}
        for w in ["apple", "river", "stone", "cloud", "amber", "lemon", "tiger", "maple"]]


def random_linear(out_features, in_features, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.weight, std=0.05)
    return layer


@pytest.mark.parametrize("group_size", [32, "channel"])
def test_qat_forward_equals_the_int4_layer_bit_for_bit(group_size):
    # 24 rows: the int4 kernel packs rows in 16s, so the real layer computes with F.linear on its weights
    layer = random_linear(24, 64, seed=1)
    x = torch.randn(3, 5, 64)
    real = Int4Linear.from_linear(layer, group_size)
    assert not real.use_kernel
    qat = prepare_qat(nn.Sequential(layer), group_size=group_size)[0]
    assert isinstance(qat, QATLinear)
    assert torch.equal(qat(x), real(x))
    # 48 rows use PyTorch's int4 kernel (bfloat16 scales, bfloat16 products): QAT trains with its weights
    layer = random_linear(48, 64, seed=2)
    real = Int4Linear.from_linear(layer, group_size)
    assert torch.equal(fake_quantize_int4(layer.weight, group_size), real.dequantized())
    qat = prepare_qat(nn.Sequential(layer), group_size=group_size)[0]
    torch.testing.assert_close(qat(x), real(x), atol=2e-2, rtol=2e-2)


def test_the_straight_through_gradient_reaches_the_latent_weight():
    layer = random_linear(32, 64, seed=3)
    w_hat = fake_quantize_int4(layer.weight, 32).requires_grad_(True)
    x = torch.randn(4, 64)
    F.linear(x, w_hat, layer.bias).square().sum().backward()
    qat = prepare_qat(nn.Sequential(layer), group_size=32)[0]
    qat(x).square().sum().backward()
    assert torch.equal(qat.weight.grad, w_hat.grad)
    assert not torch.equal(fake_quantize_int4(layer.weight, 32), layer.weight)


def dequantized_weights(quantized_model) -> dict[str, torch.Tensor]:
    """Canonical name -> the float weight each quantized layer of ``quantized_model`` computes with."""
    from scratchlm.quant.quantize import _unfused_modules

    out = {}
    for name, m, rows in _unfused_modules(quantized_model):
        if isinstance(m, Int4Linear):
            w = m.dequantized()
        else:  # the int8 embedding (a dict of tensors) or head (a tuple)
            tensors = m.portable()
            w = dequantize_int8(*(tensors.values() if isinstance(tensors, dict) else tensors))
        out[name] = w if rows is None else w[rows[0] : rows[1]]
    return out


def qat_weights(model) -> dict[str, torch.Tensor]:
    """Canonical name -> the weight a QAT model's forward uses."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QATLoRALinear):  # its merged weight
            out[name] = m.fake_quant(m.base.weight + m.delta_weight())
        elif isinstance(m, (QATLinear, QATEmbedding)):
            out[name] = m.quantized_weight().detach()
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    llm = tiny_llm("llama", seed=0)
    directory = tmp_path_factory.mktemp("base") / "tiny"
    save_model_dir(directory, llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    data = directory.parent / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return directory


def finetune(base_dir, out, **changes):
    options = dict(model=str(base_dir), data=str(base_dir.parent / "train.jsonl"), out=str(out), method="full",
                   max_steps=3, batch_size=4, lr=2e-2, eval_interval=3, val_fraction=0.25, progress=False,
                   qat="int4", group_size=32)
    return run_finetune(FinetuneOptions(**{**options, **changes}), say=lambda *a: None)


def test_full_qat_run_quantizes_into_exactly_the_trained_weights(base_dir, tmp_path):
    finetune(base_dir, tmp_path / "run")
    trained = LLM.load(tmp_path / "run" / "best")
    base = LLM.load(base_dir)
    assert not torch.equal(trained.model.blocks[0].attn.q_proj.weight, base.model.blocks[0].attn.q_proj.weight)
    assert main(["quantize", str(tmp_path / "run" / "best"), "--to", "int4", "--group-size", "32",
                 "--out", str(tmp_path / "q")]) == 0
    quantized = LLM.load(tmp_path / "q").model
    prepare_qat(trained.model, group_size=32)
    want = qat_weights(trained.model)
    got = dequantized_weights(quantized)
    assert set(want) == set(got) and len(want) == 2 * 7 + 2  # 7 int4 layers per block, int8 embedding and head
    for name in want:
        assert torch.equal(want[name], got[name]), name
    # the whole forward: QAT model == a float model holding the quantized model's weights, bit for bit
    reference = LLM.load(tmp_path / "run" / "best").model
    with torch.no_grad():
        for name, w in got.items():
            reference.get_submodule(name).weight.copy_(w)
        x = torch.tensor([[5, 80, 100, 7, 9]])
        assert torch.equal(trained.model(x), reference(x))


def test_lora_qat_quantizes_the_merged_weight(base_dir, tmp_path):
    finetune(base_dir, tmp_path / "run", method="lora", rank=4, alpha=8, dropout=0.0, group_size="channel",
             targets="q,v,down")
    assert main(["merge", str(base_dir), str(tmp_path / "run" / "best"), "--out", str(tmp_path / "merged")]) == 0
    assert main(["quantize", str(tmp_path / "merged"), "--to", "int4", "--group-size", "channel",
                 "--out", str(tmp_path / "q")]) == 0
    got = dequantized_weights(LLM.load(tmp_path / "q").model)
    adapted = LLM.load(base_dir, adapter=tmp_path / "run" / "best")  # merged at load
    fresh = LLM.load(base_dir)
    settings = LoraSettings(4, 8.0, 0.0, ("q", "v", "down"))
    apply_lora(fresh.model, settings)
    from scratchlm.finetune.peft import load_adapter

    load_adapter(fresh.model, tmp_path / "run" / "best", merge=False, check_base=False)
    prepare_qat(fresh.model, group_size="channel")
    want = qat_weights(fresh.model)
    assert "blocks.1.mlp.down_proj" in want and "blocks.1.mlp.up_proj" in want
    for name in want:
        assert torch.equal(want[name], got[name]), name
    x = torch.tensor([[5, 80, 100, 7, 9]])
    reference = LLM.load(tmp_path / "merged").model
    with torch.no_grad():
        trained = fresh.model(x)
        assert not torch.equal(trained, adapted.model(x))  # QAT's forward is not the float one...
        for name, w in got.items():
            reference.get_submodule(name).weight.copy_(w)
        assert torch.equal(trained, reference(x))  # ...it is the quantized one


def test_bad_qat_options_are_one_line_errors(base_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="not qlora"):
        finetune(base_dir, tmp_path / "a", method="qlora")
    with pytest.raises(ConfigError, match="dropout"):
        finetune(base_dir, tmp_path / "b", method="lora", dropout=0.1)
    with pytest.raises(ConfigError, match="add --qat int4"):
        finetune(base_dir, tmp_path / "c", qat=None)
    code = main(["finetune", str(base_dir), "--data", str(base_dir.parent / "train.jsonl"), "--out",
                 str(tmp_path / "d"), "--qat", "int4", "--group-size", "48", "--no-progress"])
    assert code == 2 and "group size 48" in capsys.readouterr().err
