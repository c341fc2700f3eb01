"""Loading GGUF files of every supported tensor type and HF directories (single and sharded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import byte_tokenizer
from scratchlm.errors import ModelFileError, UnsupportedError
from scratchlm.formats.gguf import permute_qk, unpermute_qk
from scratchlm.llm import LLM

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType


def hf_llama(tie: bool = True):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=260, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def random_k_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Valid Q4_K / Q6_K bytes: random quants and scales with small finite float16 super-block scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin (float16) lead the block
        data[..., 0:2] = scale
        data[..., 2:4] = scale
    else:  # Q6_K: ql[128], qh[64], scales[16], d (float16) at the end
        data[..., -2:] = scale
    return data.reshape(rows, -1)


def write_gguf(path, hf_model, qtype, rng) -> None:
    """Write ``hf_model`` as a llama GGUF with its matrices stored as ``qtype`` (as llama.cpp lays them out)."""
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tok = byte_tokenizer()  # 256 byte tokens and 3 specials, plus one merged token
    tokens = [tok.id_to_token(i) for i in range(259)] + ["\u0120\u0120"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * 3 + [1])
    w.add_token_merges(["\u0120 \u0120"])
    w.add_eos_token_id(258)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    hf_parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in hf_parts.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        x = tensor.detach().float()
        if "q_proj" in hf_name:
            x = permute_qk(x, cfg.num_attention_heads)
        elif "k_proj" in hf_name:
            x = permute_qk(x, cfg.num_key_value_heads)
        x = x.numpy()
        if x.ndim == 1 or qtype == Q.F32:
            w.add_tensor(names[hf_name], x)
        elif qtype in (Q.Q4_K, Q.Q6_K):
            w.add_tensor(names[hf_name], random_k_blocks(qtype, *x.shape, rng), raw_dtype=qtype)
        elif qtype == Q.F16:
            w.add_tensor(names[hf_name], x.astype(np.float16))
        else:
            w.add_tensor(names[hf_name], gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_gguf_of_each_type_loads_like_hf_transformers(qtype, tmp_path):
    """Same file, two loaders: ours (Q/K un-permuted, tied head) and HF's must give the same logits."""
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(path, hf_llama(tie=qtype != "Q8_0"), Q[qtype], np.random.default_rng(0))
    ours = LLM.load(path, dtype="float32")  # dequantized: the reading itself is under test
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours.model(ids), ref(ids).logits
    assert ours.config.tie_embeddings == (qtype != "Q8_0")
    assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


def test_qk_permutation_round_trips():
    w = torch.randn(4 * 64, 256)
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert not torch.equal(permute_qk(w, 4), w)


def test_gguf_unsupported_tensor_type_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    w.add_block_count(1)
    w.add_context_length(8)
    w.add_embedding_length(256)
    w.add_feed_forward_length(256)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(256)
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_XS]
    w.add_tensor("token_embd.weight", np.zeros((256, 256 // block * size), dtype=np.uint8), raw_dtype=Q.IQ4_XS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from scratchlm.formats.gguf import load_gguf

    with pytest.raises(UnsupportedError, match="IQ4_XS"):
        load_gguf(tmp_path / "bad.gguf")


def test_gguf_unsupported_architecture_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedError, match="'mamba'"):
        LLM.load(tmp_path / "mamba.gguf")


@pytest.mark.parametrize("cut", [0.5, 0.02])
def test_truncated_gguf_names_the_file(cut, tmp_path):
    path = tmp_path / "whole.gguf"
    write_gguf(path, hf_llama(), Q.F32, None)
    data = path.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ModelFileError, match="truncated.gguf"):
        LLM.load(bad)


def test_garbage_gguf_names_the_file(tmp_path):
    bad = tmp_path / "noise.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    with pytest.raises(ModelFileError, match="noise.gguf"):
        LLM.load(bad)


# -- HF directories ---------------------------------------------------------------------------------
def save_hf(model, directory, **kwargs):
    model.save_pretrained(directory, **kwargs)
    byte_tokenizer().save(directory / "tokenizer.json")


def test_sharded_hf_directory_loads(tmp_path):
    model = hf_llama(tie=False)
    save_hf(model, tmp_path, max_shard_size="400KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 260, (1, 16))
    with torch.no_grad():
        assert (LLM.load(tmp_path).model(ids) - model(ids).logits).abs().max() < 1e-4


def test_corrupt_safetensors_names_the_file(tmp_path):
    save_hf(hf_llama(), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="model.safetensors"):
        LLM.load(tmp_path)


def test_pickled_weights_load_weights_only_and_code_is_refused(tmp_path):
    """A pytorch_model.bin of tensors loads; one that needs the unsafe unpickler is refused in one line
    (more kinds in test_formats_torch.py)."""
    model = hf_llama()
    save_hf(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # what transformers 4 wrote
    ids = torch.randint(0, 260, (1, 16))
    with torch.no_grad():
        assert (LLM.load(tmp_path).model(ids) - model(ids).logits).abs().max() < 1e-4
    torch.save({**model.state_dict(), "hook": print}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelFileError, match=r"refused: it needs PyTorch's unsafe unpickler.*calls for print") as err:
        LLM.load(tmp_path)
    assert "\n" not in str(err.value)


def test_unsupported_hf_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["MistralForCausalLM"], "model_type": "mistral"}')
    with pytest.raises(UnsupportedError, match="MistralForCausalLM"):
        LLM.load(tmp_path)


def test_scratchlm_model_directory_round_trips(tmp_path):
    from conftest import tiny_llm
    from scratchlm.formats.checkpoint import save_model_dir

    llm = tiny_llm("gpt2")
    save_model_dir(tmp_path, llm.config, llm.model.canonical_state_dict(), llm.tokenizer, llm.template.source)
    again = LLM.load(tmp_path)
    ids = torch.randint(0, 260, (1, 16))
    with torch.no_grad():
        assert torch.equal(again.model(ids), llm.model(ids))
    assert again.tokenizer.eos_id == llm.tokenizer.eos_id
    assert not list(tmp_path.glob("*.tmp"))
