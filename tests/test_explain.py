"""scratchlm.explain: the next-token view, attention weights, the logit lens, labels, and what they render to.

The attention weights are checked against HF transformers' ``output_attentions=True`` (eager attention) on the
same weights: SmolLM2 (RoPE, grouped-query heads) and a tiny GPT-2 (learned positions, biases). The next-token
view is checked against log-softmax of the model's own logits, computed independently.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_llm
from scratchlm.cli import main
from scratchlm.explain import attention_weights, explain, logit_lens, token_label
from scratchlm.formats.checkpoint import save_model_dir
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


def save(llm, directory):
    save_model_dir(directory, llm.config, llm.model.canonical_state_dict(), llm.tokenizer)


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


def test_explain_cli_json_has_one_position_per_token_with_top_k(tmp_path, capsys):
    llm = tiny_llm(seed=4)
    save(llm, tmp_path / "m")
    assert main(["explain", str(tmp_path / "m"), "hi there", "--json", "--top-k", "3", "--no-progress"]) == 0
    data = json.loads(capsys.readouterr().out)
    ids = llm.tokenizer.encode("hi there")
    assert [p["id"] for p in data["positions"]] == ids
    assert all(len(p["top"]) == 3 and set(p["top"][0]) == {"id", "token", "prob"} for p in data["positions"])
    assert [layer["layer"] for layer in data["lens"]] == ["embed", "1", "2"]


def test_explain_cli_writes_heat_maps_and_a_page_then_refuses_to_overwrite(tmp_path, capsys):
    save(tiny_llm(seed=5), tmp_path / "m")
    out = tmp_path / "att"
    args = ["explain", str(tmp_path / "m"), "a<b>", "--attention", str(out), "--layers", "2", "--no-progress"]
    assert main(args) == 0
    assert "next-token view" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["attention.html"] + [f"layer02_head0{h}.png" for h in range(1, 5)]
    assert (out / "layer02_head01.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<b>" not in (out / "attention.html").read_text()  # token text is data, never markup
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert main(args[:-3] + ["--layers", "7", "--force"]) == 2
    assert "layers 1 to 2" in capsys.readouterr().err
    assert main(args[:-3] + ["--layers", "1", "--force"]) == 0  # an earlier output is replaced, whole
    assert sorted(p.name for p in out.iterdir()) == ["attention.html"] + [f"layer01_head0{h}.png" for h in range(1, 5)]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(args[:3] + ["--attention", str(tmp_path / "mine"), "--force", "--no-progress"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"  # a folder that is not ours is never replaced


def test_chat_view_covers_the_template_and_the_greedy_reply():
    llm = tiny_llm(seed=6)
    view = explain(llm, "hi", chat=True, reply_tokens=5)
    prompt = llm.encode_chat([{"role": "user", "content": "hi"}])
    assert view.ids[: len(prompt)] == prompt and view.prompt_tokens == len(prompt)
    reply = view.ids[len(prompt):]
    assert 1 <= len(reply) <= 5
    for i, token in enumerate(reply):  # greedy: each reply token was the model's first choice
        assert view.positions[len(prompt) + i - 1]["next"]["rank"] == 1
        assert view.positions[len(prompt) + i - 1]["top"][0]["id"] == token


def test_attention_page_runs_in_chromium_and_shades_what_the_query_attends_to(tmp_path):
    import os

    from scratchlm.explain.html import render_page

    if not os.path.exists("/usr/bin/chromium"):
        pytest.fail("/usr/bin/chromium is missing: apt-get install -y chromium (make test does this)") if \
            os.environ.get("CI") == "true" else pytest.skip("no chromium")
    playwright_api = pytest.importorskip("playwright.sync_api")
    llm = tiny_llm(seed=7)
    view = explain(llm, "x</script><script>alert(1)</script>")
    page_file = tmp_path / "attention.html"
    page_file.write_text(render_page(view), encoding="utf-8")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
        page = browser.new_page()
        problems = []
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.on("dialog", lambda dialog: problems.append("dialog") or dialog.dismiss())
        page.goto(page_file.as_uri())
        tokens = page.locator(".tok")
        assert tokens.count() == len(view.ids)
        assert tokens.nth(1).text_content() == view.tokens[1]
        tokens.nth(3).click()
        page.select_option("#layer", index=1)  # layer 2
        page.select_option("#head", index=3)  # head 3 (option 0 is the mean of the heads)
        titles = page.evaluate("[...document.querySelectorAll('.tok')].map(n => n.title)")
        shades = page.evaluate("[...document.querySelectorAll('.tok')].map(n => n.style.background)")
        browser.close()
    assert problems == []
    weights = view.attention[1, 2, 3]  # layer 2, head 3, query token 3
    shown = [float(t.split("weight ")[1].split()[0]) for t in titles]
    alphas = [float(s.rsplit(",", 1)[1].rstrip(")")) if s.startswith("rgba") else 1.0 for s in shades]
    for k in range(len(view.ids)):
        assert shown[k] == pytest.approx(float(weights[k]), abs=1.5e-3)
        assert alphas[k] == pytest.approx(float(weights[k]), abs=6e-3)  # the browser keeps alpha in 1/255 steps


def test_attention_page_refuses_a_size_no_browser_opens_and_keeps_chosen_layers():
    from scratchlm.errors import ConfigError
    from scratchlm.explain.html import page_data
    from scratchlm.explain.views import Explanation

    T = 300
    view = Explanation(model="m", ids=list(range(T)), tokens=["t"] * T, positions=[],
                       attention=torch.full((1, 1, 1, 1), 0.5).expand(30, 9, T, T))  # no memory for 30 layers
    with pytest.raises(ConfigError, match="--layers"):
        page_data(view)
    data = page_data(view, layers=[4, 29])
    assert data["layers"] == [5, 30] and len(data["attention"]) == 2
    assert len(data["attention"][0][0]) == T * (T + 1) // 2 and data["attention"][1][8][-1] == 500
