"""scratchlm.explain: the next-token view, attention weights, the logit lens, labels, and what they render to.

The attention weights are checked against HF transformers' ``output_attentions=True`` (eager attention) on the
same weights: SmolLM2 (RoPE, grouped-query heads) and a tiny GPT-2 (learned positions, biases). The next-token
view is checked against log-softmax of the model's own logits, computed independently.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_llm
from scratchlm.explain import attention_weights, explain, logit_lens, token_label
from scratchlm.formats.export_hf import hf_config, to_hf_state_dict

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "The capital of France is Paris. The capital of Italy is Rome."


def hf_twin(llm):
    """The HF transformers model (eager attention) holding ``llm``'s weights."""
    data = hf_config(llm.config, llm, torch.float32)
    config_class = transformers.LlamaConfig if data["model_type"] == "llama" else transformers.GPT2Config
    config = config_class(**{k: v for k, v in data.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "eager"
    model_class = transformers.LlamaForCausalLM if data["model_type"] == "llama" else transformers.GPT2LMHeadModel
    with torch.device("meta"):  # no random initialisation: the weights are assigned below
        model = model_class(config)
    model = model.to_empty(device="cpu")
    state = to_hf_state_dict(llm.config, llm.model.canonical_state_dict())
    missing, _ = model.load_state_dict(state, strict=False)
    if llm.config.tie_embeddings:
        model.tie_weights()
    for module in model.modules():  # buffers that were never weights (RoPE's inverse frequencies)
        if hasattr(module, "inv_freq"):
            module.inv_freq = 1.0 / (llm.config.rope_theta ** (torch.arange(0, llm.config.head_dim, 2).float()
                                                               / llm.config.head_dim))
            module.original_inv_freq = module.inv_freq
    assert all("lm_head" in name or "inv_freq" in name or "attn.bias" in name for name in missing), missing
    return model.eval()


def test_attention_weights_equal_hf_output_attentions_on_smollm2(smollm2):
    ids = smollm2.tokenizer.encode(TEXT)
    ours = attention_weights(smollm2, TEXT)
    hf = hf_twin(smollm2)
    with torch.no_grad():
        ref = torch.stack(hf(torch.tensor([ids]), output_attentions=True).attentions)[:, 0]
    assert ours.shape == ref.shape == (30, 9, len(ids), len(ids))
    assert (ours - ref).abs().max().item() < 1e-4
    assert torch.allclose(ours.sum(-1), torch.ones(30, 9, len(ids)), atol=1e-5)


def test_attention_weights_equal_hf_on_a_tiny_gpt2():
    llm = tiny_llm("gpt2", seed=3)
    with torch.no_grad():  # random biases, so that a missing bias would show
        for block in llm.model.blocks:
            for proj in (block.attn.q_proj, block.attn.k_proj):
                proj.bias.normal_(0, 0.5)
    ids = llm.tokenizer.encode("abc def ghi")
    with torch.no_grad():
        ref = torch.stack(hf_twin(llm)(torch.tensor([ids]), output_attentions=True).attentions)[:, 0]
    ours = attention_weights(llm, ids)
    assert ours.shape == (2, 4, len(ids), len(ids))
    assert (ours - ref).abs().max().item() < 1e-5
    assert ours[0, 0].triu(1).abs().max().item() == 0  # causal: no weight on future tokens


def test_next_token_view_agrees_with_the_models_log_softmax():
    llm = tiny_llm(seed=1)
    view = explain(llm, "hello there", top_k=4)
    ids = llm.tokenizer.encode("hello there")
    with torch.no_grad():
        logp = torch.log_softmax(llm.model(torch.tensor([ids]))[0].double(), dim=-1)
    assert [p["id"] for p in view.positions] == ids and view.tokens[5] == "␣"
    for i, pos in enumerate(view.positions):
        best = logp[i].argsort(descending=True)[:4].tolist()
        assert [t["id"] for t in pos["top"]] == best
        assert pos["top"][0]["prob"] == pytest.approx(math.exp(logp[i, best[0]]), rel=1e-4)
        assert pos["entropy"] == pytest.approx(float(-(logp[i].exp() * logp[i]).sum() / math.log(2)), rel=1e-4)
        if i + 1 < len(ids):
            nxt = ids[i + 1]
            assert pos["next"]["id"] == nxt
            assert pos["next"]["surprisal"] == pytest.approx(-float(logp[i, nxt]) / math.log(2), rel=1e-4)
            assert pos["next"]["rank"] == int((logp[i] > logp[i, nxt]).sum()) + 1
        else:
            assert pos["next"] is None
    assert view.mean_surprisal == pytest.approx(
        -float(logp[torch.arange(len(ids) - 1), ids[1:]].mean()) / math.log(2), rel=1e-4)


def test_logit_lens_last_layer_is_the_models_prediction_and_first_is_the_embedding():
    llm = tiny_llm(seed=2)
    ids = llm.tokenizer.encode("lens test")
    lens = logit_lens(llm, ids, top_k=2)
    assert [layer["layer"] for layer in lens] == ["embed", "1", "2"]
    with torch.no_grad():
        probs = llm.model(torch.tensor([ids]))[0].softmax(-1)
        emb = llm.model.tok_embeddings(torch.tensor(ids))
        probs0 = llm.model.logits(llm.model.final_norm(emb)).softmax(-1)
    for t in range(len(ids)):
        assert lens[-1]["positions"][t]["top"][0]["id"] == int(probs[t].argmax())
        assert lens[0]["positions"][t]["top"][0]["prob"] == pytest.approx(float(probs0[t].max()), rel=1e-4)
    assert lens[-1]["positions"][0]["next_prob"] == pytest.approx(float(probs[0, ids[1]]), rel=1e-4)


def test_token_labels_show_spaces_newlines_partial_bytes_and_specials():
    tok = tiny_llm().tokenizer
    assert token_label(tok, ord(" ")) == "␣"
    assert token_label(tok, ord("\n")) == "↵"
    assert token_label(tok, 0xE2) == "<E2>"  # the first byte of a three-byte character, alone
    assert token_label(tok, tok.token_to_id("<|im_end|>")) == "<|im_end|>"
    assert token_label(tok, ord("a")) == "a"
