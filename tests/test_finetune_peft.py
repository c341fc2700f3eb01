"""Adapters in HF PEFT's format (scratchlm.finetune.peft): PEFT reads ours, we read PEFT's, wrong bases refused.

The HF reference model is transformers' LlamaForCausalLM holding the same weights as ours: a tiny random one
saved with ``save_pretrained`` and read back with ``LLM.load(dir)``, and SmolLM2 read by HF from the GGUF.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import byte_tokenizer, tiny_llm
from scratchlm.errors import ModelFileError, UnsupportedError
from scratchlm.finetune.lora import LoraSettings, apply_lora, lora_layers
from scratchlm.finetune.peft import load_adapter, read_adapter, save_adapter
from scratchlm.llm import LLM

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ("q", "k", "v", "o", "gate", "up", "down")


def hf_tiny(seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """An HF Llama directory (save_pretrained) plus the byte tokenizer, so that LLM.load reads it."""
    directory = tmp_path_factory.mktemp("hf")
    hf_tiny().save_pretrained(directory)
    byte_tokenizer().save(directory / "tokenizer.json")
    return directory


def trained_adapter(model, settings, seed=1):
    """LoRA layers with non-zero B (as after training), so that the adapter changes the logits."""
    apply_lora(model, settings, seed=0)
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)


def ids(vocab=260, length=19):
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))


def test_peft_loads_our_adapter_and_reproduces_our_logits(hf_dir, tmp_path):
    llm = LLM.load(hf_dir)
    settings = LoraSettings(rank=4, alpha=8, targets=ALL)
    trained_adapter(llm.model, settings)
    save_adapter(tmp_path / "adapter", llm.model, settings, base_name=str(hf_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    _, pairs, fingerprint = read_adapter(tmp_path / "adapter")
    assert fingerprint is not None and len(pairs) == 7 * 2
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()
        assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in f.keys()
    x = ids()
    with torch.no_grad():
        ours = llm.model(x)
        model = peft.PeftModel.from_pretrained(hf_tiny(), tmp_path / "adapter").eval()
        theirs = model(x).logits
        base = hf_tiny()(x).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_we_load_a_peft_made_adapter_and_reproduce_peft_logits(hf_dir, tmp_path):
    torch.manual_seed(3)
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False, rank_pattern={"down_proj": 2})
    model = peft.get_peft_model(hf_tiny(), config).eval()
    model.save_pretrained(tmp_path / "peft")
    x = ids()
    with torch.no_grad():
        theirs = model(x).logits
        merged = LLM.load(hf_dir, adapter=tmp_path / "peft")
        unmerged = LLM.load(hf_dir)
        settings = load_adapter(unmerged.model, tmp_path / "peft", merge=False)
        torch.testing.assert_close(merged.model(x), theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(unmerged.model(x), theirs, atol=1e-5, rtol=1e-5)
    assert settings.targets == ("q", "v", "down") and settings.rank == 3
    assert lora_layers(unmerged.model)["blocks.0.mlp.down_proj"].rank == 2


def test_an_adapter_for_a_different_base_is_refused(hf_dir, tmp_path):
    llm = LLM.load(hf_dir)
    settings = LoraSettings(rank=4, alpha=8, targets=("q", "v"))
    trained_adapter(llm.model, settings)
    save_adapter(tmp_path / "adapter", llm.model, settings)
    other_weights = tiny_llm("llama", seed=5)  # same shapes, other weights
    with pytest.raises(ModelFileError, match=r"was made for a different base model: the base weights it recorded "
                                             r"differ from this model's by \d+%"):
        load_adapter(other_weights.model, tmp_path / "adapter")
    other_shape = tiny_llm("llama", d_model=32, n_heads=2, n_kv_heads=1)
    with pytest.raises(ModelFileError, match=r"different base model \(d_model 64 vs 32"):
        load_adapter(other_shape.model, tmp_path / "adapter")
    # A PEFT-made adapter carries no fingerprint: the shapes still have to fit.
    model = peft.get_peft_model(hf_tiny(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "peft")
    with pytest.raises(ModelFileError, match=r"different base model: model.layers.0.self_attn.q_proj has A \[2, 64\]"):
        load_adapter(other_shape.model, tmp_path / "peft")
    one_layer = tiny_llm("llama", n_layers=1)
    with pytest.raises(ModelFileError, match="it has layer 1, this model has 1 layers"):
        load_adapter(one_layer.model, tmp_path / "peft")


def test_unsupported_adapters_are_refused_with_the_reason(hf_dir, tmp_path):
    model = peft.get_peft_model(hf_tiny(), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    model.save_pretrained(tmp_path / "dora")
    with pytest.raises(UnsupportedError, match="DoRA is not supported"):
        LLM.load(hf_dir, adapter=tmp_path / "dora")
    with pytest.raises(ModelFileError, match="is not a LoRA adapter: adapter_config.json is missing"):
        LLM.load(hf_dir, adapter=tmp_path)
    gpt2 = tiny_llm("gpt2")
    with pytest.raises(UnsupportedError, match="GPT-2-layout model: fine-tune it with --method full"):
        load_adapter(gpt2.model, tmp_path / "dora")


def test_peft_applies_our_smollm2_adapter_to_the_hf_model_from_the_gguf(smollm2, smollm2_path, tmp_path):
    model = copy.deepcopy(smollm2.model)  # the session fixture must stay unchanged
    settings = LoraSettings(rank=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down"))
    trained_adapter(model, settings)
    save_adapter(tmp_path / "adapter", model, settings, base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    x = torch.tensor([smollm2.tokenizer.encode("The sea was calm that morning, and the fishermen rose early.")])
    with torch.no_grad():
        ours = model(x)
        hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                               dtype=torch.float32).eval()
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(x).logits
        base = smollm2.model(x)
    assert (ours - base).abs().max() > 0.1
    assert (ours - theirs).abs().max().item() < 1e-3  # the tolerance of test_smollm2's base comparison
    # And the adapter loads back onto the same base (its fingerprint matches), reproducing our logits.
    with torch.no_grad():
        again = copy.deepcopy(smollm2.model)
        load_adapter(again, tmp_path / "adapter")
        torch.testing.assert_close(again(x), ours, atol=1e-4, rtol=1e-4)
