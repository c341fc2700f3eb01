"""The static-shape decode step (scratchlm.compiled) against the eager one: same logits, same greedy text."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llm
from scratchlm.compiled import CompiledDecoder, compile_decoding
from scratchlm.errors import ContextLengthError
from scratchlm.generate import decode_step, prefill
from scratchlm.model import KVCache
from scratchlm.quant import quantize_model


@pytest.fixture(autouse=True, scope="module")
def fresh_compile_cache(tmp_path_factory):
    """Compiled steps go to $SCRATCHLM_HOME/compile: a new, empty one for this module (never a cache from before),
    shared by its tests so that a package built by one is loaded by the next."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCRATCHLM_HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_static_decode_step_matches_eager_logits(kind, quant):
    llm = tiny_llm(kind)
    if quant:
        quantize_model(llm.model, quant, 32 if quant == "int4" else None)
    model = llm.model
    static = CompiledDecoder(model, compile=False)  # the same graph, run eagerly: checks the logic fast
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]  # rows at different positions
    caches = [KVCache(model.config, 2, max_len=n) for n in (16, static.cache_length(16))]
    logits = [prefill(model, prompts, c) for c in caches]
    for _ in range(6):
        tokens = logits[0].argmax(-1, keepdim=True)
        logits = [decode_step(model, tokens, caches[0]), static(tokens, caches[1])]
        assert (logits[0] - logits[1]).abs().max().item() < 1e-4
        assert caches[0].lengths.tolist() == caches[1].lengths.tolist()


def test_compiled_greedy_output_equals_eager():
    llm = tiny_llm("llama")
    prompts = ["The sea", "Once upon a time there was"]
    eager = [c.token_ids for c in llm.complete(prompts, max_new_tokens=24, temperature=0, ignore_eos=True)]
    decoder = compile_decoding(llm.model)  # on CPU: an AOTInductor package (scratchlm.aot)
    compiled = [c.token_ids for c in llm.complete(prompts, max_new_tokens=24, temperature=0, ignore_eos=True)]
    assert compiled == eager and decoder.backend == "aot" and decoder.compiled and len(decoder.built) == 1
    llm.model.decoder = None
    assert [c.token_ids for c in llm.complete(prompts, max_new_tokens=24, temperature=0, ignore_eos=True)] == eager
    # Another model of the same shape loads that package and runs it on its own weights: none are in the package.
    other = tiny_llm("llama", seed=5)
    eager = [c.token_ids for c in other.complete(prompts, max_new_tokens=24, temperature=0, ignore_eos=True)]
    decoder = compile_decoding(other.model)
    assert [c.token_ids for c in other.complete(prompts, max_new_tokens=24, temperature=0, ignore_eos=True)] == eager
    assert decoder.built == [] and decoder.compiled
    # torch.compile (the backend off the CPU), on a quantized model: int4 layers and an int8 head under inductor
    q = tiny_llm("llama", seed=1)
    quantize_model(q.model, "int4", 32)
    eager = [c.token_ids for c in q.complete(prompts, max_new_tokens=12, temperature=0, ignore_eos=True)]
    decoder = compile_decoding(q.model, backend="dynamo")
    assert [c.token_ids for c in q.complete(prompts, max_new_tokens=12, temperature=0, ignore_eos=True)] == eager
    assert decoder.compiled


def test_aot_package_runs_on_the_models_tensors_in_place():
    """The package holds no weights: a weight changed in place after loading changes its logits as it changes the
    eager step's; the KV cache is written in place like the eager static step writes it."""
    from scratchlm.aot import load_step

    llm = tiny_llm("llama")
    model = llm.model
    decoder = compile_decoding(model)
    llm.complete(["The sea", "Once upon"], max_new_tokens=4, temperature=0, ignore_eos=True)  # batch 2's package
    layout, = decoder._steps
    step = load_step(decoder.package_path(layout), model)
    with torch.no_grad():
        model.final_norm.weight.mul_(1.5)
    caches = [KVCache(model.config, 2, max_len=layout[1]) for _ in range(2)]
    for c in caches:
        prefill(model, [[5, 6, 7], [8]], c)
    tokens = torch.tensor([[9], [10]])
    with torch.inference_mode():
        want = decoder._step(tokens, caches[0].lengths, list(caches[0].k.unbind(0)), list(caches[0].v.unbind(0)))
        got = step(tokens, caches[1].lengths, list(caches[1].k.unbind(0)), list(caches[1].v.unbind(0)))
    assert (got - want).abs().max().item() < 1e-4
    assert (caches[0].k - caches[1].k).abs().max().item() < 1e-5 and caches[1].k[:, 0, :, 3].abs().sum() > 0


def test_cache_length_is_a_power_of_two_within_the_context():
    static = CompiledDecoder(tiny_llm("llama", context_length=1024).model, compile=False)
    assert [static.cache_length(n) for n in (1, 256, 257, 600, 1024)] == [256, 256, 512, 1024, 1024]
    with pytest.raises(ContextLengthError, match="1025 tokens"):
        static.cache_length(1025)
    cache = KVCache(static.model.config, 1, max_len=4)
    cache.lengths[0] = 4
    with pytest.raises(ContextLengthError, match="full"):
        static(torch.tensor([[1]]), cache)


def test_compile_flag_on_generate_prints_the_eager_text(tmp_path, capsys):
    from scratchlm.cli import main
    from scratchlm.formats.checkpoint import save_model_dir

    llm = tiny_llm("llama")
    save_model_dir(tmp_path, llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    argv = ["generate", str(tmp_path), "The sea", "--max-new-tokens", "12", "--temperature", "0"]
    main(argv)
    eager = capsys.readouterr().out
    main([*argv, "--compile"])  # the package the tests above built for this shape, loaded
    compiled = capsys.readouterr().out
    assert compiled == eager
