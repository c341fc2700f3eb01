"""Task heads (scratchlm.heads): our last-token head equals HF's LlamaForSequenceClassification on the same weights,
and a head model saved with a full body or a LoRA body loads back to the same scores."""

from __future__ import annotations

import pytest
import torch

from conftest import byte_tokenizer
from scratchlm.errors import ConfigError, ModelFileError
from scratchlm.finetune.lora import LoraSettings, apply_lora, lora_layers
from scratchlm.heads import HeadModel, last_token_states, load_head_model, save_head_model
from scratchlm.llm import LLM

transformers = pytest.importorskip("transformers")


def hf_config(**extra):
    return transformers.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    tie_word_embeddings=False, rms_norm_eps=1e-5, **extra)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_config()).save_pretrained(directory)
    byte_tokenizer().save(directory / "tokenizer.json")
    return directory


def padded_batch(pad_id=259):
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([9, 14, 5])
    x = torch.full((3, 14), pad_id)
    for row, n in enumerate(lengths.tolist()):
        x[row, :n] = torch.randint(0, 250, (n,), generator=g)
    return x, lengths


def test_last_token_head_equals_hf_sequence_classification(hf_dir):
    llm = LLM.load(hf_dir)
    model = HeadModel(llm.model, n_outputs=3).eval()
    hf = transformers.LlamaForSequenceClassification.from_pretrained(hf_dir, num_labels=3, pad_token_id=259).eval()
    with torch.no_grad():
        hf.score.weight.copy_(model.head.weight)
        x, lengths = padded_batch()
        ours = model(x, lengths)
        theirs = hf(input_ids=x).logits
    assert ours.shape == (3, 3)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_padding_after_the_last_token_changes_nothing(hf_dir):
    model = HeadModel(LLM.load(hf_dir).model, n_outputs=1, bias=True).eval()
    x, lengths = padded_batch()
    with torch.no_grad():
        alone = torch.cat([model(x[i:i + 1, :n]) for i, n in enumerate(lengths.tolist())])
        batched = model(x, lengths)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="lengths"):
        last_token_states(torch.zeros(1, 4, 2), torch.tensor([5]))
    with pytest.raises(ConfigError, match="labels"):
        HeadModel(model.body, n_outputs=2, labels=["a"])


@pytest.mark.parametrize("body", ["model", "adapter"])
def test_saved_head_model_loads_to_the_same_scores(hf_dir, tmp_path, body):
    llm = LLM.load(hf_dir)
    lora = None
    if body == "adapter":
        lora = LoraSettings(rank=4, alpha=8, targets=("q", "v"))
        apply_lora(llm.model, lora, seed=0)
        for layer in lora_layers(llm.model).values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    model = HeadModel(llm.model, n_outputs=2, labels=["neg", "pos"], bias=True, task="classify").eval()
    torch.nn.init.normal_(model.head.bias)
    save_head_model(tmp_path / "m", model, llm.tokenizer, llm.template.source, lora=lora, base_model=str(hf_dir))
    loaded, loaded_llm = load_head_model(tmp_path / "m")
    assert loaded.labels == ["neg", "pos"] and loaded.task == "classify"
    assert loaded_llm.model is loaded.body
    x, lengths = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, lengths), model(x, lengths), atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelFileError, match="head_config.json"):
        load_head_model(hf_dir)
