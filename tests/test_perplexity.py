"""Perplexity with a sliding window, against HF transformers' own procedure on the same model and ids."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import byte_tokenizer
from scratchlm.cli import main
from scratchlm.errors import ConfigError, ContextLengthError
from scratchlm.eval.perplexity import perplexity, perplexity_of_text, windows
from scratchlm.llm import LLM

transformers = pytest.importorskip("transformers")

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them.")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random tiny HF Llama saved to disk, and scratchlm's load of that directory."""
    path = tmp_path_factory.mktemp("hf-llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=500.0, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a less flat distribution than the default init, so that errors would show
        hf.lm_head.weight.mul_(4)
    hf.save_pretrained(path)
    byte_tokenizer().save(path / "tokenizer.json")
    return hf, LLM.load(path), path


def hf_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """The loop of HF transformers' guide "Perplexity of fixed-length models", with the HF model's own loss.

    One correction: the guide weights each window's mean loss by (valid labels - 1), "due to the internal
    label shift", which is right only when the window's first label is valid (the first window, or disjoint
    windows). With overlapping windows all trg_len labels are predicted, so we count the labels that remain
    after the shift; the guide's weighting moves its result by 0.07-0.3% on this text.
    """
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()  # labels are shifted inside the model
        if num_loss_tokens > 0:
            nll_sum += loss.item() * num_loss_tokens
            n_tokens += num_loss_tokens
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("context,stride", [(32, 16), (32, 32), (48, 5), (64, 64)])
def test_perplexity_equals_hf_transformers(models, context, stride):
    hf, llm, _ = models
    ids = llm.tokenizer.encode(TEXT)
    assert len(ids) > 64  # several windows
    want = hf_perplexity(hf, torch.tensor([ids]), context, stride)
    got = perplexity(llm.model, ids, context=context, stride=stride)
    assert abs(got.perplexity / want - 1) < 1e-4  # the issue asks for 0.5%; float32 rounding is ~1e-6
    assert 1 < got.perplexity < 260 * 2


def test_windows_score_each_token_at_most_once():
    for n, context, stride in [(100, 32, 16), (100, 32, 32), (33, 32, 32), (10, 32, 8), (97, 20, 7)]:
        scored = []
        for begin, end, k in windows(n, context, stride):
            assert end - begin <= context and 0 < k < end - begin + 1
            scored += range(end - k, end)
        assert len(scored) == len(set(scored)) and 0 not in scored
        if stride < context:  # overlapping windows score every token after the first
            assert sorted(scored) == list(range(1, n))


def test_one_window_is_the_plain_cross_entropy(models):
    _, llm, _ = models
    ids = torch.tensor(llm.tokenizer.encode(TEXT[:50]))
    with torch.no_grad():
        logits = llm.model(ids[None])[0, :-1]
    want = math.exp(torch.nn.functional.cross_entropy(logits, ids[1:]).item())
    assert perplexity(llm.model, ids, context=64).perplexity == pytest.approx(want, rel=1e-5)


def test_cli_prints_the_perplexity(models, tmp_path, capsys):
    hf, llm, path = models
    text_file = tmp_path / "held_out.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    assert main(["eval", "perplexity", str(path), str(text_file), "--context", "32", "--stride", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("perplexity ")
    want = hf_perplexity(hf, torch.tensor([llm.tokenizer.encode(TEXT)]), 32, 16)
    assert float(out.split()[1]) == pytest.approx(want, rel=1e-4)


def test_quantized_perplexity_stays_close(models):
    _, _, path = models
    base = perplexity_of_text(LLM.load(path), TEXT, context=32, stride=16).perplexity
    int8 = perplexity_of_text(LLM.load(path, quantize="int8"), TEXT, context=32, stride=16).perplexity
    int4 = perplexity_of_text(LLM.load(path, quantize="int4", group_size=32), TEXT, context=32, stride=16).perplexity
    assert abs(int8 / base - 1) < 0.01
    assert abs(int4 / base - 1) < 0.10


# --------------------------------------------------------------------------------------- bad input
def test_bad_windows_and_texts_are_refused(models):
    _, llm, _ = models
    ids = llm.tokenizer.encode(TEXT)
    with pytest.raises(ConfigError, match="between 1 and the context"):
        perplexity(llm.model, ids, context=32, stride=33)
    with pytest.raises(ContextLengthError, match="context window of 64"):
        perplexity(llm.model, ids, context=65)
    with pytest.raises(ConfigError, match="at least 2"):
        perplexity(llm.model, ids[:1], context=32)


def test_cli_bad_input_is_one_line(models, tmp_path, capsys):
    _, _, path = models
    assert main(["eval", "perplexity", str(path), str(tmp_path / "missing.txt")]) == 2
    assert "not found" in capsys.readouterr().err
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00 not utf-8")
    assert main(["eval", "perplexity", str(path), str(binary)]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8" in err and err.count("\n") == 1
