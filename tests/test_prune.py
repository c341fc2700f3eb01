"""Pruning: magnitude and Wanda masks, N:M structure, structured head/channel removal into a smaller model that
transformers and llama.cpp's format read, and one-line errors for bad options."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import byte_tokenizer, tiny_llm
from export_helpers import TEXT, export_llm, logits
from scratchlm.cli import main
from scratchlm.compress.pipeline import prune_llm
from scratchlm.compress.prune import input_square_sums, n_m_mask, prune_layer, prune_model, row_mask, weight_scores
from scratchlm.compress.structured import apply_plan, mask_model, plan_structured
from scratchlm.errors import ConfigError, DataError, UnsupportedError
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.llm import LLM

pytestmark = pytest.mark.usefixtures("one_thread")
CORPUS = "src/scratchlm/data/shakespeare.txt"


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration") / "text.txt"
    with open(CORPUS, encoding="utf-8") as f:
        path.write_text(f.read(12_000), encoding="utf-8")
    return path


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_2_4_masks_keep_exactly_two_of_every_four(method, calibration):
    llm = tiny_llm()
    prune_llm(llm, method, structure=(2, 4), calibration=calibration, samples=4, seq_len=32)
    for name, p in llm.model.named_parameters():
        if name.startswith("blocks.") and p.dim() == 2:
            groups = (p != 0).reshape(p.shape[0], -1, 4).sum(dim=-1)
            assert (groups == 2).all(), name
    assert (llm.model.tok_embeddings.weight != 0).all()  # embeddings and head stay dense


def test_row_sparsity_is_exact_per_output_row_and_keeps_the_largest_scores():
    torch.manual_seed(0)
    score = torch.rand(6, 40)
    mask = row_mask(score, 0.3)
    assert (mask.sum(dim=1) == 28).all()
    for row in range(6):  # every kept score is at least every pruned score of its row
        assert score[row][mask[row]].min() >= score[row][~mask[row]].max()
    nm = n_m_mask(score, 1, 4)
    assert (nm.reshape(6, 10, 4).sum(-1) == 1).all()
    assert torch.equal(score.reshape(6, 10, 4).argmax(-1), nm.reshape(6, 10, 4).float().argmax(-1))


def test_wanda_scores_weigh_weights_by_input_norms_and_beat_magnitude_on_outlier_features():
    """With a few large input features (as LLMs have), |W| * ||X|| keeps the weights that matter: the layer's
    output error ||W X - W_pruned X|| is smaller than with |W| alone (Sun et al. 2023, section 3)."""
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    x[:, :4] *= 20  # outlier features
    layer = torch.nn.Linear(64, 32, bias=False)
    norms = x.norm(dim=0)
    expected = layer.weight.abs() * norms[None, :]
    torch.testing.assert_close(weight_scores(layer.weight, "wanda", norms), expected)
    errors = {}
    for method in ("magnitude", "wanda"):
        pruned = torch.nn.Linear(64, 32, bias=False)
        pruned.weight.data.copy_(layer.weight.data)
        prune_layer(pruned, method, 0.5, input_norm=norms)
        errors[method] = (layer(x) - pruned(x)).norm().item()
    assert errors["wanda"] < 0.7 * errors["magnitude"]


def test_calibration_statistics_equal_a_direct_computation():
    """Block 0's q_proj sees attn_norm(embeddings); its per-feature sums of squares are taken on exactly that."""
    llm = tiny_llm()
    tokens = torch.randint(0, 256, (3, 20))
    sums = input_square_sums(llm.model, tokens)
    with torch.no_grad():
        x = llm.model.blocks[0].attn_norm(llm.model.tok_embeddings(tokens))
    torch.testing.assert_close(sums["blocks.0.attn.q_proj"], x.pow(2).sum(dim=(0, 1)))
    assert len(sums) == 7 * llm.config.n_layers


@pytest.mark.parametrize(("kind", "heads", "mlp", "changes"), [
    ("llama", 0.5, 0.4, {}),  # grouped-query: 4 heads in 2 key/value groups, one group goes
    ("llama", 0.5, 0.25, dict(n_kv_heads=4, bias=True)),  # multi-head: two of four heads go
    ("gpt2", None, 0.5, {}),
])
def test_structured_pruned_model_equals_the_masked_unpruned_model(kind, heads, mlp, changes):
    llm = tiny_llm(kind, seed=2, **changes)
    tokens = torch.randint(0, 256, (4, 24))
    sums = input_square_sums(llm.model, tokens, names=("attn.o_proj", "mlp.down_proj"))
    plan = plan_structured(llm.config, sums, tokens.numel(), heads, mlp)
    small = apply_plan(llm.model, plan)
    assert small.num_parameters() < llm.model.num_parameters()
    assert small.config.d_ff == llm.config.d_ff - round((mlp or 0) * llm.config.d_ff)
    if heads:
        assert small.config.n_heads == llm.config.n_heads // 2 and small.config.head_dim == llm.config.head_dim
    mask_model(llm.model, plan)
    x = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(small(x), llm.model(x), atol=1e-5, rtol=1e-5)


def test_structured_removes_the_least_active_channels():
    llm = tiny_llm()
    d_ff = llm.config.d_ff
    sums = {f"blocks.{i}.mlp.down_proj": torch.arange(d_ff, dtype=torch.float32).flip(0) for i in range(2)}
    plan = plan_structured(llm.config, sums, 10, mlp=0.25)
    assert plan.channels[0] == list(range(d_ff - round(0.25 * d_ff)))  # the largest sums are the first channels
    # A width that was a multiple of 64 stays one (int4 groups divide it): 256 - 30% = 179 -> 192.
    config = llm.config.replace(d_ff=256)
    sums = {f"blocks.{i}.mlp.down_proj": torch.rand(256) for i in range(2)}
    assert plan_structured(config, sums, 10, mlp=0.3).config.d_ff == 192


def test_structured_pruned_model_exports_to_hf_and_gguf(tmp_path):
    """The smaller model (head_dim no longer d_model / n_heads) is a model like any other: transformers loads
    its HF export and its GGUF file to the same logits, and our loader reads the GGUF back exactly."""
    transformers = pytest.importorskip("transformers")
    from scratchlm.formats.export_gguf import export_gguf
    from scratchlm.formats.export_hf import export_hf

    llm = export_llm("llama", seed=3)
    tokens = torch.tensor([llm.tokenizer.encode(TEXT)])
    sums = input_square_sums(llm.model, tokens, names=("attn.o_proj", "mlp.down_proj"))
    plan = plan_structured(llm.config, sums, tokens.numel(), heads=0.5, mlp=0.3)
    small = LLM(apply_plan(llm.model, plan), llm.tokenizer, name="small")
    assert small.config.n_heads * small.config.head_dim < small.config.d_model
    ids = llm.tokenizer.encode(TEXT)

    path = export_hf(small, tmp_path / "hf")
    assert json.loads((path / "config.json").read_text())["head_dim"] == small.config.head_dim
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits[0], logits(small, ids), atol=1e-5, rtol=1e-5)
    assert LLM.load(path).config == small.config.replace(name=LLM.load(path).config.name)

    gguf = export_gguf(small, tmp_path / "small.gguf", "f32")
    back = LLM.load(gguf)
    assert (back.config.n_heads, back.config.head_dim, back.config.d_ff) == (
        small.config.n_heads, small.config.head_dim, small.config.d_ff)
    torch.testing.assert_close(logits(back, ids), logits(small, ids), atol=1e-5, rtol=1e-5)
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="small.gguf",
                                                                  local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(torch.tensor([ids])).logits[0], logits(small, ids), atol=1e-4, rtol=1e-4)


def test_prune_command_writes_a_loadable_model_and_a_per_layer_report(tmp_path, calibration, capsys):
    llm = tiny_llm()
    save_model_dir(tmp_path / "model", llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    code = main(["prune", str(tmp_path / "model"), "--method", "wanda", "--sparsity", "0.6", "--calibration",
                 str(calibration), "--samples", "4", "--seq-len", "32", "--out", str(tmp_path / "sparse")])
    assert code == 0
    assert "block  1:" in capsys.readouterr().out
    report = json.loads((tmp_path / "sparse" / "pruning.json").read_text())
    assert len(report["layers"]) == 14 and all(abs(r["sparsity"] - 0.6) < 0.02 for r in report["layers"])
    pruned = LLM.load(tmp_path / "sparse")
    q = pruned.model.blocks[0].attn.q_proj.weight
    assert (q == 0).float().mean().item() == pytest.approx(0.6, abs=0.02)

    code = main(["prune", str(tmp_path / "model"), "--method", "structured", "--heads", "0.5", "--mlp", "0.5",
                 "--calibration", str(calibration), "--samples", "4", "--seq-len", "32", "--out", str(tmp_path / "s")])
    assert code == 0
    small = LLM.load(tmp_path / "s")
    assert (small.config.n_heads, small.config.n_kv_heads, small.config.d_ff) == (2, 1, 80)
    assert isinstance(small.generate("Hello", max_new_tokens=3, temperature=0), str)


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "magnitude", "--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["--method", "magnitude", "--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
    (["--method", "magnitude"], "give --sparsity"),
    (["--method", "magnitude", "--structure", "2:4", "--sparsity", "0.3"], "removes 0.5 of the weights"),
    (["--method", "wanda", "--structure", "4:2"], "0 < N < M"),
    (["--method", "structured"], "needs --heads F and/or --mlp F"),
    (["--method", "structured", "--mlp", "1.5"], "--mlp must be in [0, 1)"),
    (["--method", "magnitude", "--sparsity", "0.5", "--heads", "0.5"], "go with --method structured"),
])
def test_bad_options_get_one_line_errors(tmp_path, capsys, args, message):
    code = main(["prune", "unused-model", *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_too_little_calibration_text_and_gpt2_heads_are_refused(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.", encoding="utf-8")
    with pytest.raises(DataError, match="calibration windows"):
        prune_llm(tiny_llm(), "wanda", 0.5, calibration=short, samples=4, seq_len=32)
    with pytest.raises(UnsupportedError, match="MLP channels only"):
        prune_llm(tiny_llm("gpt2"), "structured", heads=0.5, calibration=CORPUS, samples=2, seq_len=16)
    with pytest.raises(ConfigError, match="removes no head"):
        plan_structured(tiny_llm().config, {}, 1, heads=0.2)


def test_magnitude_needs_no_calibration_and_prunes_in_place():
    llm = LLM(tiny_llm().model, byte_tokenizer())
    report = prune_model(llm.model, "magnitude", 0.25)
    assert [r.name for r in report][:2] == ["blocks.0.attn.q_proj", "blocks.0.attn.k_proj"]
    assert all(abs(r.sparsity - 0.25) < 0.01 for r in report)


def test_head_dim_is_written_only_when_heads_do_not_tile_d_model():
    config = tiny_llm().config
    assert config.head_dim == 16 and "head_dim" not in config.to_dict()  # unpruned files stay as they were
    assert config.replace(d_model=128).head_dim == 32  # a derived head size follows d_model and n_heads
    pruned = config.replace(n_heads=2, n_kv_heads=1, head_dim=16)
    assert pruned.to_dict()["head_dim"] == 16 and type(pruned).from_dict(pruned.to_dict()) == pruned
    with pytest.raises(ConfigError, match="head_dim must be a positive integer"):
        config.replace(head_dim=0)
