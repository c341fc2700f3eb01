"""Weight-only int8/int4 quantization: layers against their dequantized reference, checkpoints, bad input.

Tolerances: a quantized layer must equal ``x @ dequantized(W).T`` up to the rounding of a bfloat16 product,
1e-2 of the output's largest value (the CPU kernels take bfloat16 activations and return bfloat16 outputs,
whatever the model's dtype; the dequantize fallback is exact to 1e-5). The quantization error itself is
bounded by half a step per weight.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import tiny_llm
from scratchlm.cli import main
from scratchlm.errors import ConfigError, ModelFileError
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.llm import LLM
from scratchlm.quant import (
    Int4Linear,
    Int8Linear,
    QuantEmbedding,
    dequantize_int4,
    dequantize_int8,
    int4,
    int4_pack,
    kernels,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantized_state_dict,
    save_quantized,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def random_linear(n: int, k: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(n, 1) * 4)  # rows of different magnitudes, as in real models
    return layer


# ---------------------------------------------------------------------------------------------- int8
def test_int8_quantization_error_is_at_most_half_a_step():
    w = torch.randn(64, 96) * torch.rand(64, 1)
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (64,)
    err = (dequantize_int8(q, scales) - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("rows", [5, 40])  # the fused kernel (few rows) and the dequantized product (many)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_dequantized_reference(dtype, rows):
    layer = random_linear(96, 64)
    q = Int8Linear.from_linear(layer, dtype=dtype)
    x = torch.randn(3, rows, 64).to(dtype)
    want = x.float() @ q.dequantized().t() + layer.bias
    got = q(x)
    assert got.dtype == dtype and got.shape == (3, rows, 96)
    assert rel_err(got, want) < 1e-2


# ---------------------------------------------------------------------------------------------- int4
def test_int4_quantization_error_is_at_most_half_a_step_and_refining_only_lowers_it():
    w = torch.randn(32, 128)
    w[0, :32] = 0.25  # a constant group must survive exactly
    w[1, 5] = 9.0  # an outlier that stretches min/max's grid
    for g in (32, 64, 128):
        q, scales, mins = quantize_int4(w, g, refine_steps=0)  # plain min/max grid
        assert q.shape == (32, 64) and q.dtype == torch.uint8 and scales.shape == (32, 128 // g)
        back = dequantize_int4(q, scales, mins, g)
        step = scales.repeat_interleave(g, dim=1)
        assert ((back - w).abs() <= step / 2 + 1e-6).all()
        refined = dequantize_int4(*quantize_int4(w, g), g)
        def group_err(x, g=g):
            return (x - w).square().reshape(32, -1, g).sum(-1)

        assert (group_err(refined) <= group_err(back) + 1e-6).all()
        assert group_err(refined).sum() < group_err(back).sum()
        if g == 32:
            assert (refined[0, :32] == 0.25).all()


def test_int4_recovers_weights_that_are_already_on_a_4_bit_grid():
    """Weights dequantized from a Q4_1 file (groups of 32, codes 0..15 with a step and a minimum)."""
    codes = torch.randint(0, 16, (16, 64))
    codes[:, ::32] = 0
    codes[:, 1::32] = 15  # llama.cpp's Q4_1 always uses both ends
    step, low = torch.rand(16, 2) * 0.1 + 0.01, torch.randn(16, 2)
    w = codes.float() * step.repeat_interleave(32, 1) + low.repeat_interleave(32, 1)
    assert torch.allclose(dequantize_int4(*quantize_int4(w, 32), 32), w, atol=1e-6)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_matches_dequantized_reference(group_size, dtype):
    layer = random_linear(48, 256, seed=group_size)
    q = Int4Linear.from_linear(layer, group_size, dtype=dtype)
    assert q.use_kernel == kernels.int4_kernel_available()
    x = torch.randn(4, 7, 256).to(dtype)
    want = x.float() @ q.dequantized().t() + layer.bias
    got = q(x)
    assert got.dtype == dtype and got.shape == (4, 7, 48)
    assert rel_err(got, want) < 1e-2
    # and the dequantized weight is the layer's, to within a couple of quantization steps
    assert (q.dequantized() - layer.weight).abs().max() <= 2 * q.portable()[1].max()


@pytest.mark.parametrize("n,k", [(16, 64), (48, 32), (176, 64), (80, 128), (960, 96)])
def test_int4_codes_pack_into_pytorchs_layout_bit_for_bit(n, k):
    # our packing skips PyTorch's int32 copy of the codes (start-up time); the bytes must be the same
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(n + k), dtype=torch.int32)
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    assert torch.equal(int4_pack.pack_kernel_codes(codes.to(torch.uint8)), want)


@pytest.mark.parametrize("n", [176, 96])  # blocks of 64 (or 32) rows with a shorter last block
def test_int4_prefill_path_uses_the_kernels_weights_bit_for_bit(n):
    layer = random_linear(n, 128)
    q = Int4Linear.from_linear(layer, 32, dtype=torch.bfloat16)
    if int4_pack.kernel_layout() is not None:
        on_identity = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(128, dtype=torch.bfloat16), q.packed,
                                                                 32, q.scales_and_zeros)  # W.T, as the kernel sees it
        assert torch.equal(int4_pack.dequantize_packed_t(q.packed, q.scales_and_zeros, 32), on_identity)
    x = torch.randn(3, 100, 128).bfloat16()  # 300 rows: the dequantize-then-multiply path
    assert x.shape[0] * x.shape[1] >= int4.PREFILL_MIN_ROWS
    want = x.float() @ q.dequantized().t() + layer.bias
    assert rel_err(q(x), want) < 1e-2
    kernel = int4.int4_linear(x[:1, :4], q.packed, q.scales_and_zeros, 32, q.bias)  # 4 rows: the kernel
    assert rel_err(q(x)[:1, :4], kernel) < 1e-2


def test_int4_layer_gives_back_its_codes_exactly_and_its_scales_in_bfloat16():
    layer = random_linear(64, 192, bias=False)
    qweight, scales, mins = quantize_int4(layer.weight, 64)
    q = Int4Linear(qweight, scales, mins, 64)
    got_q, got_scales, got_mins = q.portable()
    assert torch.equal(got_q, qweight)
    if q.use_kernel:  # the kernel keeps its scales in bfloat16
        assert torch.equal(got_scales, scales.bfloat16().float())
        assert (got_mins - mins).abs().max() <= 2 ** -7 * mins.abs().max()
    again = Int4Linear(got_q, got_scales, got_mins, 64)  # a saved and reloaded layer computes the same
    assert torch.equal(again.dequantized(), q.dequantized())


def test_int4_shapes_the_kernel_cannot_pack_use_the_fallback():
    layer = random_linear(40, 64)  # 40 rows: the kernel packs rows in blocks of 16
    q = Int4Linear.from_linear(layer, 32)
    assert not q.use_kernel
    x = torch.randn(2, 64)
    assert rel_err(q(x), x @ q.dequantized().t() + layer.bias) < 1e-5


def test_missing_int4_kernel_falls_back_and_says_so_once(monkeypatch, capsys):
    def missing():
        raise AttributeError("'_OpNamespace' 'aten' object has no attribute '_weight_int4pack_mm_for_cpu'")

    monkeypatch.setattr(kernels, "int4_ops", missing)
    monkeypatch.setattr(kernels, "_announced", set())
    kernels.int4_kernel_available.cache_clear()
    try:
        layers = [Int4Linear.from_linear(random_linear(32, 64, seed=s), 32) for s in range(3)]
        assert not any(q.use_kernel for q in layers)
        x = torch.randn(2, 64)
        assert rel_err(layers[0](x), x @ layers[0].dequantized().t() + layers[0].bias) < 1e-5
        err = capsys.readouterr().err
        assert err.count("no int4 kernel") == 1 and "fallback" in err
    finally:
        kernels.int4_kernel_available.cache_clear()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_embedding_rows_are_the_dequantized_rows(bits):
    emb = nn.Embedding(50, 64)
    q = QuantEmbedding.from_embedding(emb, bits, group_size=32 if bits == 4 else None)
    parts = q.portable()
    table = dequantize_int8(*parts.values()) if bits == 8 else dequantize_int4(*parts.values(), 32)
    ids = torch.tensor([[3, 49, 0], [7, 7, 12]])
    assert torch.equal(q(ids), table[ids])
    assert rel_err(q(ids), emb(ids)) < (0.01 if bits == 8 else 0.1)


# ------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("kind,tie", [("llama", True), ("llama", False), ("gpt2", True)])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_logits_stay_close_and_checkpoint_round_trips(kind, tie, mode, tmp_path):
    llm = tiny_llm(kind, tie_embeddings=tie)
    ids = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = llm.model(ids)
        quantize_model(llm.model, mode, 32 if mode == "int4" else None)
        got = llm.model(ids)
    assert not any(type(m) is nn.Linear for m in llm.model.modules())  # learned positions stay float
    assert isinstance(llm.model.tok_embeddings, QuantEmbedding)
    assert rel_err(got, ref) < (0.02 if mode == "int8" else 0.2)
    save_quantized(tmp_path, llm.model, llm.tokenizer, llm.template.source)
    loaded = LLM.load(tmp_path)
    assert loaded.model.quantization["mode"] == mode
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), got)
    assert loaded.generate("abc", max_new_tokens=5, temperature=0) == llm.generate("abc", max_new_tokens=5,
                                                                                   temperature=0)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_projections_compute_what_their_parts_did_and_save_as_the_parts(mode):
    llm = tiny_llm("llama", bias=True)
    attn, mlp = llm.model.blocks[0].attn, llm.model.blocks[0].mlp
    layers = {name: copy.deepcopy(getattr(parent, name)) for parent, names in
              ((attn, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj"))) for name in names}
    quantize_model(llm.model, mode, 32 if mode == "int4" else None)
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "up_proj")  # replaced, not kept twice
    parts = {name: (Int4Linear.from_linear(layer, 32) if mode == "int4" else Int8Linear.from_linear(layer))
             for name, layer in layers.items()}  # each part quantized alone, as before fusing
    x = torch.randn(2, 5, llm.config.d_model)
    with torch.no_grad():
        q, k, v = attn.project_qkv(x)
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        for name, got in zip(parts, (q, k, v, gate, up)):
            assert torch.equal(got, parts[name](x)), name
    saved = quantized_state_dict(llm.model)
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in saved)
    for name, layer in parts.items():
        prefix = f"blocks.0.{'attn' if name in ('q_proj', 'k_proj', 'v_proj') else 'mlp'}.{name}"
        want = layer.portable()
        for key, tensor in zip(("qweight", "scales", "mins"), want):
            assert torch.equal(saved[f"{prefix}.{key}"], tensor), (prefix, key)
        assert torch.equal(saved[f"{prefix}.bias"], layer.bias)


def test_quantize_command_writes_a_checkpoint_that_llm_load_reads(tmp_path, capsys):
    llm = tiny_llm("llama", tie_embeddings=True)
    save_model_dir(tmp_path / "float", llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    out = tmp_path / "int4"
    assert main(["quantize", str(tmp_path / "float"), "--to", "int4", "--group-size", "32", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    expected = LLM.load(tmp_path / "float", quantize="int4", group_size=32)
    loaded = LLM.load(out)
    assert (out / "quantization.json").is_file()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), expected.model(ids))
    # a file is smaller than the float one (4-bit codes + float32 scales vs float32 weights)
    assert (out / "model.safetensors").stat().st_size < 0.4 * (tmp_path / "float" / "model.safetensors").stat().st_size


# --------------------------------------------------------------------------------------- bad input
def test_quantizing_a_quantized_model_is_refused(tmp_path):
    llm = tiny_llm("llama")
    quantize_model(llm.model, "int8")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(llm.model, "int4", 32)
    save_quantized(tmp_path, llm.model, llm.tokenizer)
    with pytest.raises(ConfigError, match="already quantized"):
        LLM.load(tmp_path, quantize="int8")


@pytest.mark.parametrize("mode,group,message", [
    ("int4", 48, "choose one of 32, 64, 128"),
    ("int4", 64, "does not divide the 160 input features of blocks.0.mlp.down_proj: choose 32"),
    ("int8", 64, "applies to int4 only"),
    ("int3", None, "choose one of int8, int4"),
])
def test_bad_quantization_options_say_what_is_allowed(mode, group, message):
    llm = tiny_llm("llama")
    before = copy.deepcopy(llm.model.state_dict())
    with pytest.raises(ConfigError, match=message):
        quantize_model(llm.model, mode, group)
    assert all(torch.equal(before[k], v) for k, v in llm.model.state_dict().items())  # untouched


def test_cli_reports_bad_quantization_as_one_line(tmp_path, capsys):
    llm = tiny_llm("llama")
    save_model_dir(tmp_path / "m", llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    code = main(["quantize", str(tmp_path / "m"), "--to", "int4", "--group-size", "48", "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "32, 64, 128" in err
    assert main(["quantize", str(tmp_path / "m"), "--to", "int8", "--out", str(tmp_path / "q8")]) == 0
    assert main(["quantize", str(tmp_path / "q8"), "--to", "int4", "--group-size", "32",
                 "--out", str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_truncated_quantized_checkpoint_is_a_model_file_error(tmp_path):
    llm = tiny_llm("llama")
    quantize_model(llm.model, "int4", 32)
    save_quantized(tmp_path, llm.model, llm.tokenizer)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="model.safetensors"):
        LLM.load(tmp_path)


# ---------------------------------------------------------------------------------------- SmolLM2
def test_int8_greedy_tokens_equal_float32_on_smollm2(smollm2):
    messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    ids = smollm2.encode_chat(messages)
    want = smollm2.complete([ids], max_new_tokens=16, temperature=0, ignore_eos=True)[0].token_ids
    model = quantize_model(copy.deepcopy(smollm2.model), "int8")
    int8 = LLM(model, smollm2.tokenizer, smollm2.template)
    got = int8.complete([ids], max_new_tokens=16, temperature=0, ignore_eos=True)[0].token_ids
    assert len(want) == 16 and got == want


def test_quantize_flag_on_generate_and_serve(tmp_path, capsys):
    from scratchlm.cli import build_parser
    from scratchlm.serve.cli import load_model

    llm = tiny_llm("llama")
    save_model_dir(tmp_path, llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    expected = LLM.load(tmp_path, quantize="int4", group_size=32).generate("ab", max_new_tokens=4, temperature=0)
    assert main(["generate", str(tmp_path), "ab", "--quantize", "int4", "--group-size", "32",
                 "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    args = build_parser().parse_args(["serve", str(tmp_path), "--quantize", "int8"])
    assert load_model(args).model.quantization["mode"] == "int8"
