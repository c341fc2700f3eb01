"""The training loop, optimizer, schedule and checkpoints (scratchlm.train.{loop,optim,checkpoint}).

Tiny models (2 layers, 32 dimensions, context 16) on 30k characters of the corpus: each test trains for
a few steps in well under a second.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import ConfigError, TrainingError
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.llm import LLM
from scratchlm.model import Transformer
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.chars import train_char_tokenizer
from scratchlm.train.data import RandomBatches, eval_batches, prepare_dataset
from scratchlm.train.loop import TrainConfig, lm_loss, train
from scratchlm.train.optim import load_optimizer_tensors, lr_at, make_optimizer, optimizer_tensors
from scratchlm.train.sources import bundled_corpus

TEXT = bundled_corpus().read_text(encoding="utf-8")[:30_000]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "c.txt").write_text(TEXT, encoding="utf-8")
    tok = train_char_tokenizer([TEXT])
    return tok, prepare_dataset(root / "c.txt", tok, root / "data", progress=False)


def tiny(vocab: int, **changes) -> ModelConfig:
    base = ModelConfig(vocab_size=vocab, context_length=16, d_model=32, n_layers=2, n_heads=2, positions="learned",
                       norm="layernorm", mlp="gelu", bias=False, tie_embeddings=True, name="tiny")
    return base.replace(**changes)


def setup(corpus, seed=0, batch_size=4, **model_changes):
    tok, prepared = corpus
    torch.manual_seed(seed)
    model = Transformer(tiny(tok.vocab_size, **model_changes))
    batches = RandomBatches(prepared.train(), batch_size, model.config.context_length, seed=seed)
    val = eval_batches(prepared.val(), 8, model.config.context_length, 2)
    return model, batches, val


def config(**changes) -> TrainConfig:
    base = dict(max_steps=8, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=4, eval_batches=2)
    return TrainConfig(**{**base, **changes})


def saver(model, tok):
    return lambda d: save_model_dir(d, model.config, model.canonical_state_dict(), tok)


def fresh_run(corpus, cfg: TrainConfig, **model_changes):
    model, batches, _ = setup(corpus, **model_changes)
    return train(model, cfg, batches)


def losses(result) -> list[float]:
    return [r["loss"] for r in result.history if "loss" in r]


# ---- schedule and optimizer --------------------------------------------------------------------------
def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    lr = [lr_at(s, 1e-3, 1e-4, 10, 110) for s in range(120)]
    assert lr[0] == pytest.approx(1e-3 / 11) and lr[9] == pytest.approx(1e-3 * 10 / 11)
    assert lr[10] == pytest.approx(1e-3)
    assert lr[60] == pytest.approx(1e-4 + 0.5 * 0.9e-3)  # half way: cosine at pi/2
    assert all(a >= b for a, b in zip(lr[10:110], lr[11:111]))
    assert lr[110] == lr[119] == pytest.approx(1e-4)


def test_weight_decay_applies_to_matrices_only():
    model = Transformer(tiny(50, bias=True))
    opt = make_optimizer(model.named_parameters(), 1e-3, 0.1, (0.9, 0.99))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name
    assert any("norm" in n for n, p in model.named_parameters() if id(p) not in decayed)


def test_optimizer_state_round_trips_through_flat_tensors(corpus):
    model, batches, _ = setup(corpus)
    names = {p: n for n, p in model.named_parameters()}
    opt = make_optimizer(model.named_parameters(), 1e-3, 0.1, (0.9, 0.99))
    for _ in range(2):
        x, y = next(batches)
        lm_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    flat = optimizer_tensors(opt, names)
    assert "tok_embeddings.weight::exp_avg_sq" in flat and float(flat["tok_embeddings.weight::step"]) == 2
    fresh = make_optimizer(model.named_parameters(), 1e-3, 0.1, (0.9, 0.99))
    load_optimizer_tensors(fresh, names, flat)
    for a, b in zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_loss_ignores_targets_of_minus_100():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    masked = targets.clone()
    masked[:, :2] = -100
    expected = torch.nn.functional.cross_entropy(logits[:, 2:].reshape(-1, 7), targets[:, 2:].reshape(-1))
    assert lm_loss(logits, masked).item() == pytest.approx(expected.item(), rel=1e-6)
    assert lm_loss(logits, torch.full_like(targets, -100)).item() == 0.0  # fully masked: 0, not nan


def test_bad_train_config_values_are_config_errors():
    with pytest.raises(ConfigError, match="max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(ConfigError, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ConfigError, match="dtype"):
        TrainConfig(dtype="float16")


# ---- the loop ----------------------------------------------------------------------------------------
def test_training_lowers_the_validation_loss(corpus):
    model, batches, val = setup(corpus)
    result = train(model, config(max_steps=40, eval_interval=20), batches, val)
    evals = [r for r in result.history if "val_loss" in r]
    assert math.log(model.config.vocab_size) - 0.3 < losses(result)[0]  # starts near uniform
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < losses(result)[0] - 0.5
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))


def test_gradient_accumulation_equals_one_big_batch(corpus):
    tok, prepared = corpus
    rows = next(RandomBatches(prepared.train(), 8, 16, seed=5))
    halves = [(rows[0][:4], rows[1][:4]), (rows[0][4:], rows[1][4:])]
    torch.manual_seed(0)
    a = Transformer(tiny(tok.vocab_size))
    b = Transformer(tiny(tok.vocab_size))
    b.load_state_dict(a.state_dict())
    train(a, config(max_steps=1, batch_size=8), iter([rows]))
    train(b, config(max_steps=1, batch_size=4, grad_accum_steps=2), iter(halves))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_activation_checkpointing_gives_the_same_losses(corpus):
    plain = fresh_run(corpus, config(max_steps=4))
    model, batches, _ = setup(corpus)
    checkpointed = train(model, config(max_steps=4, activation_checkpointing=True), batches)
    assert losses(checkpointed) == pytest.approx(losses(plain), abs=1e-6)


def test_bfloat16_autocast_trains_close_to_float32(corpus):
    fp32 = fresh_run(corpus, config(max_steps=6))
    model, batches, _ = setup(corpus)
    bf16 = train(model, config(max_steps=6, dtype="bfloat16"), batches)
    assert model.tok_embeddings.weight.dtype == torch.float32  # master weights stay float32
    assert losses(bf16) != losses(fp32)  # it really ran in bfloat16
    assert losses(bf16) == pytest.approx(losses(fp32), abs=0.05)


def test_dropout_is_active_in_training_only(corpus):
    no_drop = fresh_run(corpus, config(max_steps=3))
    model, batches, val = setup(corpus, dropout=0.2)
    drop = train(model, config(max_steps=3), batches)
    assert losses(drop)[0] != losses(no_drop)[0]
    model.eval()
    x, _ = val[0]
    assert torch.equal(model(x), model(x))


def test_only_the_trainable_parameters_change(corpus):
    model, batches, _ = setup(corpus)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, config(max_steps=3), batches, trainable=["blocks.1.mlp.up_proj.weight", "final_norm.weight"])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"blocks.1.mlp.up_proj.weight", "final_norm.weight"}
    with pytest.raises(ConfigError, match="nope"):
        train(model, config(max_steps=1), batches, trainable=["nope"])


def test_early_stopping_after_evaluations_without_improvement(corpus):
    model, batches, val = setup(corpus)
    # A learning rate far below float32 resolution: the weights never change, so neither does the loss.
    cfg = config(max_steps=40, eval_interval=2, lr=1e-30, min_lr=1e-30, early_stopping=3)
    result = train(model, cfg, batches, val)
    assert result.stopped_early and result.step == 8  # best at step 2, then 3 evaluations without improvement
    # The repr is one short line (the history of a real run is ~60 KB): counts and losses, not the records.
    text = repr(result)
    assert text == (f"TrainResult(step=8, train_loss={result.train_loss:.4f}, val_loss={result.val_loss:.4f}, "
                    f"best_val_loss={result.best_val_loss:.4f}, stopped_early=True, elapsed={result.elapsed:.1f}s, "
                    f"history=[{len(result.history)} records])")
    assert len(result.history) == 8 + 4 and 0 < result.elapsed < 60


# ---- checkpoints -------------------------------------------------------------------------------------
def test_checkpoints_load_with_llm_load_and_scratchlm_generate(corpus, tmp_path, capsys):
    tok, _ = corpus
    model, batches, val = setup(corpus)
    train(model, config(), batches, val, out_dir=tmp_path, save_model=saver(model, tok))
    for kind in ("best", "last"):
        assert sorted(p.name for p in (tmp_path / kind).iterdir()) == sorted(
            ["model_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "trainer_state.json"] + (["optimizer.safetensors"] if kind == "last" else []))
    llm = LLM.load(tmp_path / "last")
    x, _ = val[0]
    model.eval()
    torch.testing.assert_close(llm.model(x), model(x))
    assert llm.tokenizer.encode("Ham.") == tok.encode("Ham.")
    state = ckpt.read_trainer_state(tmp_path / "last")
    assert state["step"] == 8 and state["data"] == [{"seed": 0, "index": 8}]
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}
    from scratchlm.cli import main

    assert main(["generate", str(tmp_path / "best"), "Ham", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip() != ""
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_resume_gives_the_same_losses_as_training_straight_through(corpus, tmp_path):
    tok, _ = corpus
    straight = fresh_run(corpus, config(max_steps=8, eval_interval=4), dropout=0.1)

    class Stop(Exception):
        pass

    class StopAfterFirstCheckpoint:
        def on_start(self, *a): pass
        def on_step(self, record): pass
        def on_end(self, result): pass
        def on_eval(self, record):
            raise Stop

    model, batches, val = setup(corpus, dropout=0.1)
    with pytest.raises(Stop):
        train(model, config(max_steps=8, eval_interval=4), batches, val, out_dir=tmp_path,
              save_model=saver(model, tok), reporter=StopAfterFirstCheckpoint())
    # Python's and NumPy's generators are part of the state, so their draws continue exactly too.
    np.random.seed(123)
    model, batches, val = setup(corpus, seed=99, dropout=0.1)  # other init and data seed: all must be restored
    batches.seed = 0
    resumed = train(model, config(max_steps=8, eval_interval=4), batches, val, out_dir=tmp_path,
                    save_model=saver(model, tok), resume_from=tmp_path / "last")
    assert losses(resumed) == losses(straight)[4:]


def test_resume_with_another_model_configuration_says_what_differs(corpus, tmp_path):
    tok, _ = corpus
    model, batches, val = setup(corpus)
    train(model, config(max_steps=4), batches, val, out_dir=tmp_path, save_model=saver(model, tok))
    other, batches, _ = setup(corpus, n_layers=3, d_model=48)
    with pytest.raises(TrainingError) as info:
        train(other, config(max_steps=8), batches, val, out_dir=tmp_path, save_model=saver(other, tok),
              resume_from=tmp_path / "last")
    message = str(info.value)
    assert "d_model 32 in the checkpoint vs 48 now" in message and "n_layers 2 in the checkpoint vs 3 now" in message


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(corpus, tmp_path):
    tok, _ = corpus
    model, batches, val = setup(corpus)
    calls = []

    def flaky_save(directory):
        calls.append(directory)
        if len(calls) > 2:  # best and last at step 4 succeed; step 8 hits a full disk
            saver(model, tok)(directory)
            raise OSError(28, "No space left on device")
        saver(model, tok)(directory)

    expected = r"could not write checkpoint .*No space left.*previous checkpoint .* intact"
    with pytest.raises(TrainingError, match=expected):
        train(model, config(max_steps=8), batches, val, out_dir=tmp_path, save_model=flaky_save)
    assert ckpt.read_trainer_state(tmp_path / "last")["step"] == 4
    LLM.load(tmp_path / "last")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_checkpoint_moved_aside_mid_swap_is_still_found(tmp_path):
    ckpt.write_checkpoint(tmp_path / "last", lambda d: None, None, {"step": 1})
    (tmp_path / "last").rename(tmp_path / ".last.old")  # a crash between the two renames
    assert ckpt.resolve_checkpoint(tmp_path / "last") == tmp_path / ".last.old"


class NaNAfter(Transformer):
    """A model whose logits turn into NaN from its ``n``-th training forward call on."""

    def __init__(self, config, n):
        super().__init__(config)
        self.calls, self.n = 0, n

    def forward(self, input_ids, *args, **kwargs):
        logits = super().forward(input_ids, *args, **kwargs)
        if not self.training:
            return logits
        self.calls += 1
        return logits * float("nan") if self.calls >= self.n else logits


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    tok, prepared = corpus
    torch.manual_seed(0)
    model = NaNAfter(tiny(tok.vocab_size), n=7)
    batches = RandomBatches(prepared.train(), 4, 16, seed=0)
    val = eval_batches(prepared.val(), 8, 16, 2)
    with pytest.raises(TrainingError) as info:
        train(model, config(max_steps=8, eval_interval=4), batches, val, out_dir=tmp_path,
              save_model=saver(model, tok))
    message = str(info.value)
    assert "the loss became nan at step 7" in message and str(tmp_path / "last") in message and "--lr" in message
    state = ckpt.read_trainer_state(tmp_path / "last")
    assert state["step"] == 4
    assert all(torch.isfinite(p).all() for p in LLM.load(tmp_path / "last").model.parameters())


def test_compiled_training_matches_eager(corpus, monkeypatch):
    # Dynamo traces the model exactly as with the default backend; the "eager" backend skips inductor's C++
    # build (a minute on 2 cores), which this test does not need: it checks the loop's wiring (the compiled
    # module trains, the plain one evaluates and saves with canonical names).
    real_compile = torch.compile
    compiled = []

    def eager_compile(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    plain = fresh_run(corpus, config(max_steps=3))
    model, batches, val = setup(corpus)
    result = train(model, config(max_steps=3, compile=True), batches, val)
    assert compiled == [model]
    assert losses(result) == pytest.approx(losses(plain), abs=1e-5)
    assert set(model.canonical_state_dict()) == set(Transformer(model.config).canonical_state_dict())
