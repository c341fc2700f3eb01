"""Many LoRA adapters on one base in one batch (serve/adapters.py): each request gets what the model merged with its
adapter (``scratchlm merge``) gives alone, while requests for different adapters and the base share decode steps;
adapters of other ranks per module work; an adapter made for another base is refused with the reason."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

from conftest import tiny_llm
from scratchlm.errors import ConfigError, ModelFileError
from scratchlm.finetune.lora import LoRALinear, LoraSettings, apply_lora
from scratchlm.finetune.merge import merge_to_directory
from scratchlm.finetune.peft import base_fingerprint, load_adapter, save_adapter
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.llm import LLM
from scratchlm.serve.adapters import ServedAdapters, parse_adapter_specs
from scratchlm.serve.app import create_app
from scratchlm.serve.background import BackgroundServer
from scratchlm.serve.engine import Engine, GenerationJob
from test_serve_support import run_jobs

pytestmark = pytest.mark.usefixtures("one_thread")
SEED = 5


def make_adapter(directory, settings: LoraSettings, seed: int, small_rank: dict[str, int] | None = None):
    """A LoRA adapter for the tiny base with random (non-zero) B, as if trained; ``small_rank`` gives some modules
    their own rank (PEFT's rank_pattern)."""
    llm = tiny_llm(seed=SEED)
    fingerprint = base_fingerprint(llm.model)
    layers = apply_lora(llm.model, settings, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for name, rank in (small_rank or {}).items():
        parent, _, attr = name.rpartition(".")
        layers[name] = LoRALinear(layers[name].base, rank, settings.alpha, use_rslora=settings.use_rslora)
        setattr(llm.model.get_submodule(parent), attr, layers[name])
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.weight.normal_(0, 0.3, generator=generator)
            layer.lora_B.weight.normal_(0, 0.3, generator=generator)
    return save_adapter(directory, llm.model, settings, fingerprint=fingerprint)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_llm(seed=SEED)
    base_dir = save_model_dir(root / "base", base.config, base.model.canonical_state_dict(), base.tokenizer)
    adapters = {
        "poet": make_adapter(root / "poet", LoraSettings(rank=4, alpha=8), seed=1),
        # other targets, rsLoRA scaling, rank 8 except two modules of rank 2 and 3
        "sql": make_adapter(root / "sql", LoraSettings(rank=8, alpha=4, targets=("q", "v", "down"), use_rslora=True),
                            seed=2, small_rank={"blocks.0.attn.q_proj": 2, "blocks.1.mlp.down_proj": 3}),
    }
    merged = {name: LLM.load(merge_to_directory(base_dir, d, root / f"merged-{name}")) for name, d in adapters.items()}
    return base_dir, adapters, {"tiny-llama": LLM.load(base_dir), **merged}


PROMPTS = [[(3 * j + i) % 250 for j in range(5 + 9 * i)] for i in range(3)]


def mixed_jobs(names: list[str], llm):
    jobs = []
    for i, prompt in enumerate(PROMPTS):
        for a in range(len(names)):
            settings = dict(temperature=0.0) if (i + a) % 2 else dict(temperature=0.9, seed=i)
            params = llm.sampling(max_new_tokens=12, **settings)
            jobs.append((GenerationJob(prompt, params, 12, index=len(jobs), adapter=a, logprobs=0), settings))
    return jobs


def test_rows_of_different_adapters_in_one_batch_equal_each_merged_model_alone(setup):
    base_dir, adapter_dirs, references = setup
    llm = LLM.load(base_dir)
    served = ServedAdapters(llm.model, adapter_dirs, "tiny-llama")
    engine = Engine(llm, max_batch=9, adapters=served)
    steps = []
    original = engine._select
    engine._select = lambda ids: (steps.append(set(ids)), original(ids))
    jobs = mixed_jobs(served.names, llm)
    engine.start()
    try:
        got = run_jobs(engine, [job for job, _ in jobs])
    finally:
        engine.stop()
    assert any(step == {0, 1, 2} for step in steps)  # base and both adapters in one forward pass
    for job, settings in jobs:
        reference = references[served.names[job.adapter]]
        alone = reference.complete([job.prompt_ids], max_new_tokens=12, **settings)[0]
        assert got[job.index]["text"] == alone.text, (served.names[job.adapter], settings)
        # Each generated token's log-probability equals the merged model's in one forward pass over the text.
        tokens = [lp.token_id for lp in got[job.index]["logprobs"]]
        n = len(job.prompt_ids)
        with torch.no_grad():
            full = reference.model(torch.tensor([job.prompt_ids + tokens]))[0, n - 1:].log_softmax(-1)
        expected = full[torch.arange(len(tokens)), tokens]
        assert torch.allclose(torch.tensor([lp.logprob for lp in got[job.index]["logprobs"]]), expected, atol=1e-4)
    texts = {served.names[job.adapter]: got[job.index]["text"] for job, _ in jobs if job.prompt_ids == PROMPTS[2]
             and job.params.temperature == 0}
    assert len(set(texts.values())) == len(texts)  # the adapters change the output: the comparison means something


def dense_twin(quantized) -> torch.nn.Module:
    """A float model holding exactly the dequantized weights of a quantized (fused) one."""
    from scratchlm.model import build_model
    from scratchlm.quant.quantize import _unfused_modules

    state = {k: v for k, v in quantized.state_dict().items() if k.endswith("norm.weight")}
    for name, module, rows in _unfused_modules(quantized):
        if name == "tok_embeddings":
            weight = module(torch.arange(module.num_embeddings)).float()
        else:
            weight = module.dequantized(torch.float32)
        state[f"{name}.weight"] = weight if rows is None else weight[rows[0]: rows[1]]
    return build_model(quantized.config, state)


def test_adapters_on_a_quantized_base_with_fused_projections(setup):
    """int8 layers with q/k/v and gate/up fused (how a quantized server runs): each part's update lands in its own
    columns; the result equals the dequantized weights with the adapter merged."""
    from scratchlm.quant import quantize_model

    base_dir, adapter_dirs, _ = setup
    llm = LLM.load(base_dir)
    quantize_model(llm.model, "int8")
    assert llm.model.blocks[0].attn.qkv_proj is not None
    twin = LLM(dense_twin(llm.model), llm.tokenizer, name="twin")
    load_adapter(twin.model, adapter_dirs["sql"], check_base=False)
    served = ServedAdapters(llm.model, adapter_dirs, "tiny-llama")
    engine = Engine(llm, max_batch=4, adapters=served).start()
    try:
        jobs = [GenerationJob(p, llm.sampling(temperature=0, max_new_tokens=10), 10, index=i, adapter=2)
                for i, p in enumerate(PROMPTS)]
        got = run_jobs(engine, jobs)
    finally:
        engine.stop()
    for job in jobs:
        assert got[job.index]["text"] == twin.complete([job.prompt_ids], temperature=0, max_new_tokens=10)[0].text


def test_an_adapter_for_another_base_is_refused_with_the_reason(setup, tmp_path):
    _, adapter_dirs, _ = setup
    other = tiny_llm(seed=SEED + 1)  # same shapes, other weights
    with pytest.raises(ModelFileError, match="made for a different base model: the base weights it recorded differ"):
        ServedAdapters(other.model, adapter_dirs, "other")
    wider = tiny_llm(seed=SEED, d_model=96)
    with pytest.raises(ModelFileError, match="different base model .*d_model 64 vs 96"):
        ServedAdapters(wider.model, {"poet": adapter_dirs["poet"]}, "wider")
    with pytest.raises(ConfigError, match="is the base model's name"):
        ServedAdapters(tiny_llm(seed=SEED).model, {"tiny": adapter_dirs["poet"]}, "tiny")


def test_adapter_flag_values(setup, tmp_path):
    _, adapter_dirs, _ = setup
    poet = str(adapter_dirs["poet"])
    assert parse_adapter_specs([f"poet={poet}", f"b={poet}"]) == ({"poet": poet, "b": poet}, None)
    assert parse_adapter_specs([poet]) == ({}, poet)  # a bare directory is merged, as in generate and chat
    with pytest.raises(ConfigError, match="given twice"):
        parse_adapter_specs([f"a={poet}", f"a={poet}"])
    with pytest.raises(ConfigError, match="is not a LoRA adapter directory"):
        parse_adapter_specs([f"a={tmp_path}"])
    with pytest.raises(ConfigError, match="only one --adapter DIR can be merged"):
        parse_adapter_specs([poet, poet])


def test_the_server_lists_adapters_and_a_request_chooses_one(setup):
    base_dir, adapter_dirs, references = setup
    app = create_app(LLM.load(base_dir), adapters=adapter_dirs, max_batch=4, model_name="tiny-llama")
    body = {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}
    with BackgroundServer(app) as url:
        models = httpx.get(url + "/v1/models").json()["data"]
        answers, threads = {}, []
        for name in ("poet", "tiny-llama", "sql"):  # at the same time
            def post(name=name):
                answers[name] = httpx.post(url + "/v1/completions", json={**body, "model": name}, timeout=60).json()
            threads.append(threading.Thread(target=post))
            threads[-1].start()
        for t in threads:
            t.join()
        missing = httpx.post(url + "/v1/completions", json={**body, "model": "poem"})
        card = httpx.get(url + "/v1/models/sql").json()
    assert [m["id"] for m in models] == ["tiny-llama", "poet", "sql"]
    assert models[1]["parent"] == "tiny-llama" and models[1]["root"] == str(adapter_dirs["poet"])
    assert card["id"] == "sql" and card["parent"] == "tiny-llama"
    for name, answer in answers.items():
        assert answer["model"] == name
        assert answer["choices"][0]["text"] == references[name].complete([PROMPTS[1]], temperature=0,
                                                                          max_new_tokens=8)[0].text
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == (
        "The model 'poem' does not exist; this server serves 'tiny-llama', 'poet', 'sql'")


def test_decode_sized_passes_apply_adapters_on_one_thread_and_restore_the_count(setup, monkeypatch):
    """On two threads, a decode-sized pass runs the small LoRA products on one (each would otherwise be an OpenMP
    region costing more than its work) and gives what one thread gives; a long prefill keeps both threads; the
    caller's thread count is back afterwards."""
    from scratchlm.serve import adapters as adapters_module

    base_dir, adapter_dirs, _ = setup
    llm = LLM.load(base_dir)
    served = ServedAdapters(llm.model, adapter_dirs, "tiny-llama")
    seen = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: (seen.append(torch.get_num_threads()), bmm(*a))[1])  # a spy
    short = torch.tensor([PROMPTS[1][:4]] * 3)
    long = torch.tensor([(PROMPTS[2] * 8)[: adapters_module.SINGLE_THREAD_ROWS + 1]])
    outputs = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                served.select([0, 1, 2])
                outputs[threads] = llm.model(short)
                assert torch.get_num_threads() == threads
                decode_seen, seen[:] = list(seen), []
                served.select([2])
                llm.model(long)
                prefill_seen, seen[:] = list(seen), []
        finally:
            torch.set_num_threads(1)
        assert decode_seen and set(decode_seen) == {1 if adapters_module._OPENMP else threads}
        assert prefill_seen and set(prefill_seen) == {threads}
    assert torch.allclose(outputs[1], outputs[2], atol=1e-5)
    served.select([0, 0, 0])
    with torch.no_grad():
        assert not torch.allclose(llm.model(short), outputs[1], atol=1e-3)  # the adapters did change the rows


def test_rows_of_some_adapters_equal_those_adapters_alone(setup):
    """When some adapters have no rows, the used ones are taken as a range of the stacks (those between them get
    empty groups) or, when the range would be over twice as wide, copied out by index; either way each row gets
    its own adapter's update."""
    base_dir, adapter_dirs, _ = setup
    poet, sql = adapter_dirs["poet"], adapter_dirs["sql"]
    llm = LLM.load(base_dir)
    served = ServedAdapters(llm.model, {"p1": poet, "p2": poet, "s3": sql, "p4": poet, "s5": sql}, "tiny-llama")
    tokens = torch.tensor([PROMPTS[1][:6], PROMPTS[2][:6]])

    def forward(ids):
        served.select(ids)
        with torch.no_grad():
            return llm.model(tokens)

    alone = {a: forward([a, a]) for a in range(6)}
    assert not torch.allclose(alone[1], alone[3], atol=1e-3)  # poet and sql differ
    for ids in ([1, 3], [3, 1], [1, 5], [5, 0], [2, 3], [4, 4]):  # a gap, reversed, index path, base row, ...
        got = forward(ids)
        for row, a in enumerate(ids):
            assert torch.allclose(got[row], alone[a][row], atol=1e-5), (ids, row)
        stacks = served.selection.plan(tokens.shape[1]).adapters
        assert isinstance(stacks, torch.Tensor) if ids == [1, 5] else isinstance(stacks, slice)  # both paths run
