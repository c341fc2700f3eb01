"""The transformer against HF transformers, and the KV cache against the full forward pass."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from scratchlm.config import PRESETS, ModelConfig, preset
from scratchlm.errors import ConfigError, ContextLengthError
from scratchlm.llm import LLM
from scratchlm.model import KVCache, Transformer

transformers = pytest.importorskip("transformers")


def hf_tiny(kind: str, tmp_path, tie: bool = False):
    """A random tiny HF model saved to disk, and scratchlm's load of the same directory."""
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       rope_theta=500.0, rms_norm_eps=1e-6, tie_word_embeddings=tie)
        hf = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        hf = transformers.GPT2LMHeadModel(cfg)
    hf.eval().save_pretrained(tmp_path)
    from conftest import byte_tokenizer

    byte_tokenizer().save(tmp_path / "tokenizer.json")
    return hf, LLM.load(tmp_path).model


@pytest.mark.parametrize("kind,tie", [("llama", False), ("llama", True), ("gpt2", True)])
def test_logits_match_hf_transformers(kind, tie, tmp_path):
    hf, ours = hf_tiny(kind, tmp_path, tie)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape == (2, 40, 300)
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_kv_cache_decode_matches_full_forward(kind):
    torch.manual_seed(0)
    model = Transformer(tiny_config(kind)).eval()
    ids = torch.randint(0, 260, (3, 24))
    with torch.no_grad():
        full = model(ids)
        for batch in (ids[:1], ids):  # unbatched and batched
            cache = KVCache(model.config, batch.shape[0], max_len=32)
            steps = [model(batch[:, :9], cache)]
            steps += [model(batch[:, t : t + 1], cache) for t in range(9, 24)]
            stepped = torch.cat(steps, dim=1)
            assert (stepped - full[: batch.shape[0]]).abs().max().item() < 1e-5
            assert cache.lengths.tolist() == [24] * batch.shape[0]


def test_ragged_batch_matches_each_sequence_alone():
    """Right-padded prompts of different lengths, then decode steps: each row equals its own run."""
    torch.manual_seed(0)
    model = Transformer(tiny_config("llama")).eval()
    a, b = torch.randint(0, 260, (1, 5)), torch.randint(0, 260, (1, 11))
    batch = torch.zeros(2, 11, dtype=torch.long)
    batch[0, :5], batch[1] = a[0], b[0]
    cache = KVCache(model.config, 2, max_len=20)
    with torch.no_grad():
        logits = model(batch, cache, input_lengths=torch.tensor([5, 11]))
        assert (logits[0, :5] - model(a)[0]).abs().max() < 1e-5
        nxt = torch.tensor([[7], [8]])
        step = model(nxt, cache)[:, 0]
        assert (step[0] - model(torch.cat([a, nxt[:1]], 1))[0, -1]).abs().max() < 1e-5
        assert (step[1] - model(torch.cat([b, nxt[1:]], 1))[0, -1]).abs().max() < 1e-5
        # A step on one row only (the server's join/leave case) leaves the other row untouched.
        only = model(torch.tensor([[3]]), cache, rows=torch.tensor([1]))[0, 0]
        assert (only - model(torch.cat([b, nxt[1:], torch.tensor([[3]])], 1))[0, -1]).abs().max() < 1e-5
        assert cache.lengths.tolist() == [6, 13]


def test_context_overflow_is_reported_with_both_lengths():
    model = Transformer(tiny_config("llama")).eval()
    with pytest.raises(ContextLengthError, match="130 tokens.*128"):
        model(torch.zeros(1, 130, dtype=torch.long))


def test_tied_head_shares_the_embedding_and_counts_once():
    cfg = tiny_config("gpt2")
    model = Transformer(cfg)
    assert model.lm_head.weight is model.tok_embeddings.weight
    assert "lm_head.weight" not in model.canonical_state_dict()
    assert model.num_parameters() == sum(t.numel() for t in model.canonical_state_dict().values())


def test_presets_match_their_published_sizes():
    # SmolLM2-135M has 134.5M parameters with tied embeddings; GPT-2 small has 124.4M.
    with torch.device("meta"):
        assert round(Transformer(PRESETS["smollm2-135m"]).num_parameters() / 1e6, 1) == 134.5
        assert round(Transformer(PRESETS["gpt2-124m"]).num_parameters() / 1e6, 1) == 124.4


@pytest.mark.parametrize("changes,message", [
    (dict(d_model=65), "divisible by n_heads"),
    (dict(n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(dropout=1.5), "dropout"),
    (dict(n_layers=0), "n_layers must be a positive integer"),
])
def test_invalid_config_is_rejected_with_a_reason(changes, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("llama").replace(**changes)


def test_config_round_trips_through_dict():
    cfg = preset("smollm2-135m")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("gpt-5")
