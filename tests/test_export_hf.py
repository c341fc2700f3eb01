"""HF export: transformers loads the directory offline and computes the same logits and token ids."""

from __future__ import annotations

import json

import pytest
import torch

from export_helpers import TEXT, export_llm, logits
from scratchlm.formats.export_hf import export_hf
from scratchlm.llm import LLM

transformers = pytest.importorskip("transformers")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name 3 colours."}]


def hf_load(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def chat_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in transformers 5


def assert_same_as_hf(llm, path, atol=1e-5):
    model, tokenizer = hf_load(path)
    ids = llm.tokenizer.encode(TEXT)
    assert tokenizer(TEXT)["input_ids"] == ids
    assert tokenizer.decode(ids) == llm.tokenizer.decode(ids)
    assert chat_ids(tokenizer, MESSAGES) == llm.encode_chat(MESSAGES)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(theirs, logits(llm, ids), atol=atol, rtol=1e-5)


@pytest.mark.parametrize(("kind", "pretokenizer", "changes"), [
    ("llama", "gpt2", {}),
    ("llama", "gpt4", dict(bias=True, tie_embeddings=True)),
    ("gpt2", "smollm", {}),
    ("gpt2", "gpt2", dict(bias=False, tie_embeddings=False)),  # biases are written as zeros
])
def test_transformers_matches_tiny_models(tmp_path, kind, pretokenizer, changes):
    llm = export_llm(kind, pretokenizer, **changes)
    path = export_hf(llm, tmp_path / "out")
    assert_same_as_hf(llm, path)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [{"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[kind]]
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == llm.tokenizer.eos_id
    assert generation["bos_token_id"] == llm.tokenizer.bos_id
    # Our own HF loader reads the export back to the same function.
    assert torch.allclose(logits(LLM.load(path), llm.tokenizer.encode(TEXT)), logits(llm, llm.tokenizer.encode(TEXT)),
                          atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_export(tmp_path, dtype):
    from safetensors.torch import load_file

    llm = export_llm("llama")
    path = export_hf(llm, tmp_path / "out", dtype=dtype)
    assert {t.dtype for t in load_file(path / "model.safetensors").values()} == {dtype}
    config = json.loads((path / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == str(dtype).removeprefix("torch.")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    ids = llm.tokenizer.encode(TEXT)
    with torch.no_grad():
        theirs = model.eval()(torch.tensor([ids])).logits[0]
    rounded = LLM(llm.model, llm.tokenizer)  # same model, weights rounded to dtype and back
    rounded.model = type(llm.model)(llm.config).eval()
    rounded.model.load_state_dict({k: v.to(dtype).float() for k, v in llm.model.state_dict().items()})
    torch.testing.assert_close(theirs, logits(rounded, ids), atol=1e-5, rtol=1e-5)


def test_smollm2_matches_transformers(smollm2, tmp_path):
    path = export_hf(smollm2, tmp_path / "smollm2")
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == smollm2.template.source
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert_same_as_hf(smollm2, path, atol=1e-4)


def test_model_trained_from_scratch_matches_transformers(tmp_path):
    """A GPT-2-style model trained here with its own BPE tokenizer: same ids and logits in transformers."""
    from export_helpers import trained_from_scratch

    llm = trained_from_scratch()
    assert_same_as_hf(llm, export_hf(llm, tmp_path / "out"))


def test_a_model_in_quantized_layers_is_refused_by_every_exporter(tmp_path):
    """A quantized GGUF loads into int4/int8 layers by default; exports need the dense weights and say how."""
    from scratchlm.errors import UnsupportedError
    from scratchlm.formats.export_gguf import export_gguf
    from scratchlm.formats.onnx import export_onnx
    from scratchlm.quant.quantize import quantize_model

    llm = export_llm()
    quantize_model(llm.model, "int4", 32)
    for export in (export_hf, export_gguf, export_onnx):
        with pytest.raises(UnsupportedError, match=r"int4 layers.*dtype='float32'"):
            export(llm, tmp_path / f"out-{export.__name__}")
        assert not (tmp_path / f"out-{export.__name__}").exists()
