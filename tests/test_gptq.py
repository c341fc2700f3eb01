"""GPTQ (quant/gptq.py), per-channel and 3-bit int4, and ``scratchlm quantize --method gptq``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from conftest import tiny_llm
from scratchlm.cli import main
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.llm import LLM
from scratchlm.quant.calibration import block_inputs, block_linears, calibration_tokens, inputs_of, run_block
from scratchlm.quant.gptq import Hessian, gptq_quantize, gptq_quantize_model
from scratchlm.quant.int4 import Int4Linear, dequantize_int4, quantize_int4

pytestmark = pytest.mark.usefixtures("one_thread")
CORPUS = "src/scratchlm/data/shakespeare.txt"


def output_error(weight: torch.Tensor, quantized: torch.Tensor, x: torch.Tensor) -> float:
    """||W X - Q(W) X|| over the inputs x [n, K] (the rows of X^T)."""
    return float(torch.linalg.norm(x @ weight.t() - x @ quantized.t()))


@pytest.mark.parametrize("group_size,bits", [(32, 4), (128, 4), ("channel", 4), (64, 3)])
def test_gptq_with_an_identity_hessian_and_no_damping_is_round_to_nearest(group_size, bits):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    gptq = gptq_quantize(w, torch.eye(256), group_size, bits, damp=0.0)
    rtn = quantize_int4(w, group_size, bits=bits)
    for a, b in zip(gptq, rtn):
        assert torch.equal(a, b)


@pytest.mark.parametrize("group_size,bits,act_order", [(32, 4, False), (128, 4, True), ("channel", 4, False),
                                                        ("channel", 4, True), (64, 3, False)])
def test_gptq_output_error_is_below_round_to_nearest_on_correlated_inputs(group_size, bits, act_order):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g) * 0.05
    # inputs with correlated features and a few loud ones, as hidden states have
    x = torch.randn(2048, 256, generator=g) @ (torch.randn(256, 256, generator=g) / 16)
    x[:, :8] *= 10
    hessian = Hessian(256)
    for part in x.split(500):
        hessian.add(part)
    torch.testing.assert_close(hessian.value(), x.t() @ x / len(x), rtol=1e-4, atol=1e-4)
    gptq = dequantize_int4(*gptq_quantize(w, hessian.value(), group_size, bits, act_order), group_size)
    rtn = dequantize_int4(*quantize_int4(w, group_size, bits=bits), group_size)
    assert output_error(w, gptq, x) < 0.8 * output_error(w, rtn, x)
    assert set(gptq_quantize(w, hessian.value(), group_size, bits)[0].unique().tolist()) <= set(range(256))


def test_gptq_output_error_is_below_round_to_nearest_on_smollm2_layers(smollm2):
    text = open(CORPUS, encoding="utf-8").read()[:40_000]
    tokens = torch.tensor(smollm2.tokenizer.encode(text)[:2048]).view(8, 256)
    model = smollm2.model
    states = block_inputs(model, tokens, batch_size=8)
    for block in model.blocks[:3]:
        states = run_block(block, states)
    block = model.blocks[3]
    for name in ("attn.q_proj", "mlp.down_proj"):
        seen = []
        inputs_of(block, states, name, seen.append)
        x = torch.cat(seen).reshape(-1, seen[0].shape[-1])
        w = block.get_submodule(name).weight.detach()
        for group in (64, "channel"):
            rtn = dequantize_int4(*quantize_int4(w, group), group)
            # the error GPTQ minimises: on the calibration inputs themselves
            gptq = dequantize_int4(*gptq_quantize(w, x.t() @ x / len(x), group), group)
            assert output_error(w, gptq, x) < 0.8 * output_error(w, rtn, x), (name, group)
            if name == "attn.q_proj":  # and on tokens it has not seen (576 inputs: 1,024 tokens calibrate it well)
                fit, held_out = x[:1024], x[1024:]
                gptq = dequantize_int4(*gptq_quantize(w, fit.t() @ fit / len(fit), group), group)
                assert output_error(w, gptq, held_out) < 0.9 * output_error(w, rtn, held_out), (name, group)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sequential_gptq_equals_running_the_whole_block_for_every_layer_group(kind):
    """gptq_quantize_model keeps the attention's and the MLP's inputs between passes (SequentialPasses); the
    reference here runs every block from its start for every group, as the GPTQ reference code does."""
    llm = tiny_llm(kind, seed=4)
    tokens = torch.randint(0, llm.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(llm.model)
    states = block_inputs(reference, tokens, batch_size=2)
    want = {}
    for i, block in enumerate(reference.blocks):
        for names in block_linears(block):
            hessian = Hessian(block.get_submodule(names[0]).in_features)
            inputs_of(block, states, names[0], hessian.add)
            for name in names:
                layer = block.get_submodule(name)
                want[i, name] = gptq_quantize(layer.weight, hessian.value(), 32)
                layer.weight.data = dequantize_int4(*want[i, name], 32)
        states = run_block(block, states)
    gptq_quantize_model(llm.model, tokens, 32, batch_size=2)
    for i, block in enumerate(llm.model.blocks):
        for name in ("attn.o_proj", "mlp.down_proj"):
            assert torch.equal(block.get_submodule(name).portable()[0], want[i, name][0]), (i, name)
        got = block.attn.qkv_proj.portable()[0]
        assert torch.equal(got, torch.cat([want[i, f"attn.{n}_proj"][0] for n in "qkv"])), i
    ids = tokens[:1, :8]
    with torch.no_grad():  # and the model computes with them: the reference's weights, to bfloat16 rounding
        torch.testing.assert_close(llm.model(ids), reference(ids), atol=0.05, rtol=0.05)


def test_one_pass_gptq_takes_every_hessian_from_the_float_block_and_sequential_does_not():
    llm = tiny_llm("llama", seed=3)
    tokens = torch.randint(0, llm.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    block = llm.model.blocks[0]
    states = block_inputs(llm.model, tokens, batch_size=2)
    want = {}
    for names in block_linears(block):  # the inputs of the *float* block 0, one Hessian per group
        hessian = Hessian(block.get_submodule(names[0]).in_features)
        inputs_of(block, states, names[0], hessian.add)
        for name in names:
            want[name] = gptq_quantize(block.get_submodule(name).weight, hessian.value(), 32)[0]
    one_pass, sequential = copy.deepcopy(llm.model), copy.deepcopy(llm.model)
    gptq_quantize_model(one_pass, tokens, 32, sequential=False, batch_size=2)
    gptq_quantize_model(sequential, tokens, 32, sequential=True, batch_size=2)
    for name in ("attn.o_proj", "mlp.down_proj"):  # unfused int4 layers: their codes are GPTQ's
        assert torch.equal(one_pass.blocks[0].get_submodule(name).portable()[0], want[name]), name
        # true-sequential fits o and down to the outputs of the already quantized q/k/v and gate/up
        assert not torch.equal(sequential.blocks[0].get_submodule(name).portable()[0], want[name]), name
    fused = one_pass.blocks[0].attn.qkv_proj.portable()[0]  # q/k/v read the same float input in both variants
    assert torch.equal(fused, torch.cat([want[n] for n in ("attn.q_proj", "attn.k_proj", "attn.v_proj")]))
    assert torch.equal(fused, sequential.blocks[0].attn.qkv_proj.portable()[0])


@pytest.mark.parametrize("group_size", [32, "channel"])
def test_per_channel_and_group_int4_layers_compute_their_dequantized_weight(group_size):
    torch.manual_seed(2)
    layer = nn.Linear(192, 48)
    q = Int4Linear.from_linear(layer, group_size)
    x = torch.randn(3, 192)
    want = x @ q.dequantized().t() + layer.bias
    assert torch.allclose(q(x), want, atol=3e-2, rtol=3e-2)
    qweight, scales, mins = q.portable()
    assert scales.shape == ((48, 1) if group_size == "channel" else (48, 6))
    again = Int4Linear(qweight, scales, mins, group_size, layer.bias)
    assert torch.equal(again.dequantized(), q.dequantized()) and torch.equal(again(x), q(x))
    if group_size == "channel":  # per channel is the same matrix as a group of 32 with one pair per row
        rtn = quantize_int4(layer.weight, "channel")
        assert torch.equal(dequantize_int4(*rtn, "channel"),
                           dequantize_int4(rtn[0], rtn[1].expand(48, 6), rtn[2].expand(48, 6), 32))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    llm = tiny_llm("llama", seed=0)
    directory = tmp_path_factory.mktemp("gptq") / "tiny"
    save_model_dir(directory, llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    (directory.parent / "calib.txt").write_text(open(CORPUS, encoding="utf-8").read()[:20_000], encoding="utf-8")
    return directory


def test_quantize_command_with_gptq_writes_what_llm_load_reads(tiny_dir, tmp_path, capsys):
    calib = tiny_dir.parent / "calib.txt"
    out = tmp_path / "q"
    code = main(["quantize", str(tiny_dir), "--to", "int4", "--method", "gptq", "--calibration", str(calib),
                 "--samples", "4", "--seq-len", "64", "--group-size", "channel", "--bits", "3", "--act-order",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "GPTQ" in capsys.readouterr().out
    info = json.loads((out / "quantization.json").read_text())
    assert info["method"] == "gptq" and info["bits"] == 3 and info["group_size"] == "channel"
    loaded = LLM.load(out)
    expected = LLM.load(tiny_dir)
    tokens = calibration_tokens(expected.tokenizer, calib, 4, 64)
    gptq_quantize_model(expected.model, tokens, "channel", 3, act_order=True)
    ids = torch.tensor([[5, 80, 100, 7, 9]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), expected.model(ids))
    layer = loaded.model.blocks[1].mlp.down_proj
    assert isinstance(layer, Int4Linear) and int(layer.dequantized().unique().numel()) <= 8 * 64  # 3-bit rows


def test_quantize_command_refuses_bad_gptq_input_in_one_line(tiny_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be: that is the question.")
    cases = [
        (["--method", "gptq"], "--calibration FILE"),
        (["--method", "gptq", "--calibration", str(short)], "calibration windows"),
        (["--method", "gptq", "--calibration", str(tmp_path / "none.txt")], "not found"),
        (["--calibration", str(short)], "apply to --method gptq only"),
        (["--group-size", "48"], "group size 48"),
    ]
    for extra, message in cases:
        code = main(["quantize", str(tiny_dir), "--to", "int4", "--out", str(tmp_path / "q"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp_path / "q").exists()
