"""GGUF export: our block quantizers against the gguf package, round trips through scratchlm, and HF
transformers loading the files we write (``from_pretrained(dir, gguf_file=...)``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export_helpers import TEXT, export_llm, logits
from scratchlm.errors import UnsupportedError
from scratchlm.formats.export_gguf import GGUF_PRE_NAMES, export_gguf
from scratchlm.formats.ggml_quants import quantize
from scratchlm.formats.gguf import read_gguf
from scratchlm.llm import LLM
from scratchlm.tokenizer import GGUF_PRE_TOKENIZERS, pretokenize

gguf = pytest.importorskip("gguf")
QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
          "q4_1": gguf.GGMLQuantizationType.Q4_1}


def awkward_matrix() -> torch.Tensor:
    """Random rows plus blocks that exercise the edge cases of each format."""
    torch.manual_seed(1)
    w = torch.randn(64, 128) * 0.05
    w[0, :32] = 0.0  # all-zero block: scale 0, inverse scale 0
    w[1, :32] = 0.25  # constant block: max == min for Q4_1
    w[2, :32] = torch.linspace(-1, 1, 32)
    w[3, :32] = torch.linspace(-1, 1, 32).flip(0)  # largest magnitude positive vs negative first
    w[4, :32] = torch.tensor([0.5, -0.5] * 16)  # ties in |x|: the first one wins in Q4_0
    w[5, :32] = torch.arange(32) / 127 * 3.0  # exact halves for the rounding of Q8_0
    w[6] *= 1e4  # large values
    w[7] *= 1e-6  # tiny values (scales become float16 subnormals)
    return w


@pytest.mark.parametrize("kind", QTYPES)
def test_quantizer_bytes_equal_the_gguf_package(kind):
    w = awkward_matrix()
    ours = quantize(w, kind)
    reference = gguf.quants.quantize(w.numpy(), QTYPES[kind])
    assert ours.dtype == np.uint8 and ours.shape == reference.shape
    assert np.array_equal(ours, reference)


@pytest.mark.parametrize("kind", QTYPES)
def test_dequantized_error_within_the_format_bound(kind):
    w = awkward_matrix()[8:]  # ordinary random rows
    back = gguf.quants.dequantize(quantize(w, kind), QTYPES[kind]).reshape(w.shape)
    blocks = w.reshape(-1, 32).numpy()
    err = np.abs(back.reshape(-1, 32) - blocks).max(axis=1)
    amax = np.abs(blocks).max(axis=1)
    # Half a quantization step (Q4_0: a full step at the positive end, which stops at +7 of -8..7), plus
    # the float16 rounding of the scale and minimum.
    step = {"q8_0": amax / 127, "q4_0": amax / 8 * 2, "q4_1": (blocks.max(1) - blocks.min(1)) / 15}[kind]
    bound = 0.5 * step + amax * 2**-9 + 1e-12
    assert (err <= bound).all(), f"{kind}: worst error {err.max()} > bound"
    assert err.max() > 0  # it really quantized


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_f32_round_trip_is_exact(tmp_path, kind):
    llm = export_llm(kind, bias=True, tie_embeddings=kind == "gpt2")
    path = export_gguf(llm, tmp_path / "m.gguf", "f32")
    back = LLM.load(path)
    ids = llm.tokenizer.encode(TEXT)
    assert back.tokenizer.encode(TEXT) == ids
    assert torch.equal(logits(back, ids), logits(llm, ids))
    assert back.template.source == llm.template.source
    assert (back.tokenizer.bos_token, back.tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    c, b = llm.config, back.config
    assert (b.n_layers, b.n_heads, b.n_kv_heads, b.d_ff, b.context_length, b.vocab_size, b.tie_embeddings) == (
        c.n_layers, c.n_heads, c.n_kv_heads, c.d_ff, c.context_length, c.vocab_size, c.tie_embeddings)


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lossy_round_trip_holds_exactly_the_stored_values(tmp_path, kind, gguf_type):
    """What scratchlm reads back equals the gguf package's own quantize -> dequantize of each weight."""
    llm = export_llm(kind, tie_embeddings=False)
    path = export_gguf(llm, tmp_path / "m.gguf", gguf_type)
    back = LLM.load(path, dtype="float32").model.canonical_state_dict()  # dequantized (a dtype given)
    for name, w in llm.model.canonical_state_dict().items():
        if w.ndim == 1 or name == "pos_embeddings.weight":
            expected = w  # kept in F32
        elif gguf_type == "f16":
            expected = w.half().float()
        else:
            kind_here = "q8_0" if name in ("tok_embeddings.weight", "lm_head.weight") and gguf_type != "q8_0" \
                else gguf_type
            qtype = QTYPES[kind_here]
            expected = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))
        assert torch.equal(back[name], expected.reshape(w.shape)), name
    ids = llm.tokenizer.encode(TEXT)
    top = (logits(LLM.load(path, dtype="float32"), ids).argmax(-1) == logits(llm, ids).argmax(-1)).float().mean()
    assert top > 0.5  # random tiny weights: only a sanity check that the quantized model is the same model


def test_metadata_llama_cpp_needs(tmp_path):
    llm = export_llm("llama", pretokenizer="smollm")
    _, meta = read_gguf(export_gguf(llm, tmp_path / "m.gguf", "q4_0"))
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == 2  # LLAMA_FTYPE_MOSTLY_Q4_0
    assert meta["general.quantization_version"] == 2
    cfg = llm.config
    assert meta["llama.block_count"] == cfg.n_layers and meta["llama.embedding_length"] == cfg.d_model
    assert meta["llama.attention.head_count"] == cfg.n_heads
    assert meta["llama.attention.head_count_kv"] == cfg.n_kv_heads
    assert meta["llama.rope.dimension_count"] == cfg.head_dim
    assert meta["llama.rope.freq_base"] == cfg.rope_theta
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg.vocab_size
    tok = llm.tokenizer
    for text, i in tok.special_tokens.items():
        assert tokens[i] == text and types[i] == 3  # CONTROL
    assert tokens[-1] == f"[PAD{cfg.vocab_size - 1}]" and types[-1] == 5  # UNUSED placeholder
    assert types[ord("a")] == 1 and tokens[ord("a")] == "a"
    assert meta["tokenizer.ggml.merges"] == [f"{a} {b}" for a, b in tok.merges]
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_id and meta["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert meta["tokenizer.chat_template"] == llm.template.source
    reader, _ = read_gguf(tmp_path / "m.gguf")
    stored = {t.name: t.tensor_type.name for t in reader.tensors}
    assert stored["blk.0.attn_q.weight"] == "Q4_0" and stored["blk.0.attn_norm.weight"] == "F32"
    assert stored["token_embd.weight"] == "Q8_0" and stored["output.weight"] == "Q8_0"


def test_pre_tokenizer_names_are_llama_cpps_and_read_back():
    assert GGUF_PRE_NAMES == {"gpt2": "gpt-2", "smollm": "smollm", "gpt4": "dbrx"}
    for ours, theirs in GGUF_PRE_NAMES.items():
        assert GGUF_PRE_TOKENIZERS[theirs] == ours


def test_gpt4_split_equals_llama_cpp_dbrx_regex():
    """llama.cpp's DBRX/Llama-3 regex (llama-vocab.cpp), which spells out the case-insensitive contractions,
    splits like our cl100k pattern on text with contractions, digits, punctuation runs and newlines."""
    import regex

    llama_cpp = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    text = "I'LL say it's 12345678 don't!!!\n\n\r\n  x  ...\n\tTABS\t\n ünï 'Re 'VE a--b " + TEXT
    assert pretokenize(text, "gpt4") == regex.findall(llama_cpp, text)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hf_transformers_loads_the_gguf(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    # transformers maps gpt2.context_length to GPT2Config.n_ctx, not n_positions (default 1024), so its GGUF
    # loader only reads GPT-2 files with a context of 1024 (like OpenAI's GPT-2).
    llm = export_llm(kind, context_length=1024 if kind == "gpt2" else 128)
    export_gguf(llm, tmp_path / "m.gguf", "f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", local_files_only=True)
    ids = llm.tokenizer.encode(TEXT)
    with torch.no_grad():
        theirs = hf.eval()(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(theirs, logits(llm, ids), atol=1e-4, rtol=1e-4)


def test_smollm2_reexport_round_trip_and_hf(smollm2, tmp_path):
    """SmolLM2 out to GGUF F32 and back: identical logits in scratchlm; HF transformers agrees."""
    transformers = pytest.importorskip("transformers")
    path = export_gguf(smollm2, tmp_path / "smollm2.f32.gguf", "f32")
    messages = [{"role": "user", "content": "What is 12 + 30? Answer briefly."}]
    ids = smollm2.encode_chat(messages)
    expected = logits(smollm2, ids)
    back = LLM.load(path)
    assert back.encode_chat(messages) == ids
    assert torch.equal(logits(back, ids), expected)
    del back
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, local_files_only=True)
    with torch.no_grad():
        theirs = hf.eval()(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(theirs, expected, atol=2e-4, rtol=1e-4)


def test_refuses_what_gguf_cannot_hold(tmp_path):
    odd = export_llm("llama", d_model=48, n_heads=4, n_kv_heads=2, d_ff=96)
    with pytest.raises(UnsupportedError, match="blocks of 32 values.*rows of 48"):
        export_gguf(odd, tmp_path / "odd.gguf", "q4_0")
    export_gguf(odd, tmp_path / "odd.gguf", "f16")  # the same model is fine unquantized
    from conftest import tiny_llm

    with pytest.raises(UnsupportedError, match="no BPE merges"):
        export_gguf(tiny_llm("llama"), tmp_path / "bytes.gguf", "f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.gguf"]


def test_model_trained_from_scratch_round_trips_through_gguf(tmp_path):
    from export_helpers import trained_from_scratch

    llm = trained_from_scratch()
    back = LLM.load(export_gguf(llm, tmp_path / "m.gguf", "f32"))
    ids = llm.tokenizer.encode(TEXT)
    assert back.tokenizer.encode(TEXT) == ids
    assert torch.equal(logits(back, ids), logits(llm, ids))


def test_smollm2_q4_1_reexport_reproduces_llama_cpps_bytes(smollm2, smollm2_path, tmp_path):
    """The pulled file was quantized by llama.cpp's tools (Q4_1, token embedding Q8_0). Dequantized by us and
    quantized again by our Q4_1/Q8_0 code, every tensor comes back byte for byte."""
    ours, _ = read_gguf(export_gguf(smollm2, tmp_path / "smollm2.q4_1.gguf", "q4_1"))
    theirs, _ = read_gguf(smollm2_path)
    mine = {t.name: t for t in ours.tensors}
    assert sorted(mine) == sorted(t.name for t in theirs.tensors)
    for t in theirs.tensors:
        assert mine[t.name].tensor_type == t.tensor_type, t.name
        assert np.array_equal(np.asarray(mine[t.name].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), t.name
