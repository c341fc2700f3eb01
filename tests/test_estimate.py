"""scratchlm.estimate: parameter counts against our models and HF transformers' (on the meta device), GPT-3's
published training compute, ZeRO's memory figures, and the memory estimate against the measured peak of a real
CPU training run (with and without activation checkpointing) and of a generation run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from scratchlm.cli import main
from scratchlm.config import PRESETS, ModelConfig
from scratchlm.estimate import (
    estimate,
    inference_memory,
    parameters,
    training_memory,
)
from scratchlm.model import skeleton

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_equals_our_model_built_from_the_preset(name):
    config = PRESETS[name]
    assert parameters(config)["total"] == skeleton(config).num_parameters()


# The published configs (HF config.json files; GPT-3 from Brown et al. 2020, table 2.1, on GPT-2's architecture),
# written out here rather than taken from our presets, so that a wrong preset fails.
HF_MODELS = {
    "gpt2-124m": ("GPT2", dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)),
    "gpt2-355m": ("GPT2", dict(n_embd=1024, n_layer=24, n_head=16, n_positions=1024, vocab_size=50257)),
    "gpt2-774m": ("GPT2", dict(n_embd=1280, n_layer=36, n_head=20, n_positions=1024, vocab_size=50257)),
    "gpt2-1558m": ("GPT2", dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257)),
    "gpt3-175b": ("GPT2", dict(n_embd=12288, n_layer=96, n_head=96, n_positions=2048, vocab_size=50257)),
    "llama2-7b": ("Llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)),
    "llama3-70b": ("Llama", dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)),
    "smollm2-135m": ("Llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)),
    "smollm2-360m": ("Llama", dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                   num_attention_heads=15, num_key_value_heads=5, tie_word_embeddings=True)),
    "smollm2-1.7b": ("Llama", dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                   num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=True)),
    "gpt1-117m": ("OpenAIGPT", dict(n_embd=768, n_layer=12, n_head=12, n_positions=512, vocab_size=40478)),
}
LM_CLASSES = {"GPT2": "GPT2LMHeadModel", "Llama": "LlamaForCausalLM", "OpenAIGPT": "OpenAIGPTLMHeadModel"}


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_parameter_count_equals_hf_transformers(name):
    family, fields = HF_MODELS[name]
    config = getattr(transformers, f"{family}Config")(**fields)
    with torch.device("meta"):  # shapes only: a 175B model costs no memory
        model = getattr(transformers, LM_CLASSES[family])(config)
    ours = parameters(PRESETS[name])["total"]
    # GPT-1 has no norm on its embeddings; our post-norm stack adds one (2 x d_model), said in config.py.
    extra = 2 * 768 if name == "gpt1-117m" else 0
    assert ours == model.num_parameters() + extra


def test_gpt3_training_compute_is_within_5_percent_of_the_published_figure():
    report = estimate(PRESETS["gpt3-175b"], tokens=300e9)
    # Brown et al. 2020, table D.1: 3.14e23 FLOPs (3,640 petaflop/s-days) for 175B parameters on 300B tokens.
    assert abs(report["train_flops"] / 3.14e23 - 1) < 0.05
    assert abs(report["train_flops_6n"] / 3.14e23 - 1) < 0.01


def test_zero_stages_reproduce_the_zero_papers_example():
    # Rajbhandari et al. 2020, figure 1: 7.5B parameters, 64 devices, mixed precision with Adam:
    # 120 GB per device, 31.4 GB (stage 1), 16.6 GB (stage 2), 1.9 GB (stage 3).
    config = PRESETS["llama2-7b"]
    scale = 7.5e9 / parameters(config)["total"]
    for sharding, gb in (("none", 120), ("zero1", 31.4), ("zero2", 16.6), ("zero3", 1.9), ("fsdp", 1.9)):
        m = training_memory(config, 1, 16, "mixed", sharding, devices=64)
        states = m["weights_bytes"] + m["gradients_bytes"] + m["optimizer_bytes"]
        assert states * scale / 1e9 == pytest.approx(gb, abs=0.06)


def test_inference_kv_cache_per_token_matches_the_models_own_cache():
    from scratchlm.model import KVCache

    config = PRESETS["tiny-llama"]
    cache = KVCache(config, batch_size=2, max_len=100)
    m = inference_memory(config, batch_size=2, context=100)
    assert m["kv_cache_bytes"] == cache.k.nbytes + cache.v.nbytes


MEASURE = textwrap.dedent('''
    import gc, json, sys
    import torch
    from scratchlm.config import ModelConfig
    from scratchlm.generate import decode_step, prefill
    from scratchlm.model import KVCache, Transformer
    from scratchlm.train.loop import TrainConfig, train

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    def batches(vocab, b, t):
        g = torch.Generator().manual_seed(0)
        while True:
            x = torch.randint(0, vocab, (b, t + 1), generator=g)
            yield x[:, :-1], x[:, 1:]

    def training(config, b, t, checkpointing):
        model = Transformer(config)
        train(model, TrainConfig(max_steps=2, batch_size=b, eval_interval=1000, warmup_steps=0,
                                 activation_checkpointing=checkpointing), batches(config.vocab_size, b, t))

    def generation(config, b, t):
        model = Transformer(config).eval()
        with torch.inference_mode():
            cache = KVCache(config, b)
            logits = prefill(model, [[i % config.vocab_size for i in range(t)]] * b, cache)
            for _ in range(4):
                logits = decode_step(model, logits.argmax(-1, keepdim=True), cache)

    torch.set_num_threads(1)
    spec = json.loads(sys.argv[1])
    config = ModelConfig(**spec["config"])
    tiny = ModelConfig(**{**spec["config"], "d_model": 32, "n_heads": 2, "n_kv_heads": 2, "d_ff": 64, "n_layers": 1})
    peaks = {}
    warm_ups = {"train": lambda c: training(c, 2, 8, False), "checkpointed": lambda c: training(c, 2, 8, True),
                "generate": lambda c: generation(c, 1, 8)}
    for name, run in warm_ups.items():
        run(tiny)  # kernels, thread pools and lazy imports load before the baseline
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident size (VmHWM) starts again from the current size
        base = status("VmRSS")
        if name == "generate":
            generation(config, spec["batch"], spec["prompt"])
        else:
            training(config, spec["batch"], spec["seq"], name == "checkpointed")
        peaks[name] = status("VmHWM") - base
        gc.collect()
    print(json.dumps(peaks))
''')


def test_memory_estimates_are_within_15_percent_of_measured_peaks():
    """A real training run (``train.loop.train``: AdamW, two steps, so that the optimizer state exists) and a
    generation run, each in a fresh process. Peak resident memory is read from the kernel (VmHWM, reset with
    /proc/self/clear_refs) against the resident size just before the run; glibc is told to return freed blocks
    over 64 KiB to the system (MALLOC_MMAP_THRESHOLD_), so that resident memory follows what is in use."""
    fields = dict(vocab_size=4096, context_length=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=688)
    spec = {"config": fields, "batch": 2, "seq": 256, "prompt": 200}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(spec)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    config = ModelConfig(**fields)
    estimated = {
        "train": training_memory(config, 2, 256, "float32")["peak_bytes"],
        "checkpointed": training_memory(config, 2, 256, "float32", checkpointing=True)["peak_bytes"],
        "generate": inference_memory(config, batch_size=2, context=256, prompt_tokens=200)["total_bytes"],
    }
    ratios = {k: estimated[k] / measured[k] for k in measured}
    assert all(abs(r - 1) < 0.15 for r in ratios.values()), (ratios, measured, estimated)


def test_estimate_cli_json_and_errors(tmp_path, capsys):
    assert main(["estimate", "gpt2-124m", "--tokens", "1e9", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"]["total"] == 124_439_808
    assert report["train_flops"] == pytest.approx(1e9 * report["flops_per_token"]["train_per_token"])
    assert report["chinchilla_tokens"] == 20 * 124_439_808
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny-llama"].to_dict()))
    assert main(["estimate", str(tmp_path / "config.json"), "--tokens", "2B"]) == 0
    assert "151,872 parameters" in capsys.readouterr().out
    assert main(["estimate", "gpt-9"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert main(["estimate", "gpt2-124m", "--seq-len", "4096"]) == 2
    assert "context window" in capsys.readouterr().err
