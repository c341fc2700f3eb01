"""Checkpoints pickled by PyTorch, read with the weights-only unpickler: HF pytorch_model.bin, nanoGPT ckpt.pt,
litgpt lit_model.pth. Each file is laid out as the real tool writes it and the logits are compared with HF's."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import byte_tokenizer
from scratchlm.errors import ModelFileError, UnsupportedError
from scratchlm.info import model_info
from scratchlm.llm import LLM

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 260, (1, 24), generator=torch.Generator().manual_seed(1))


def hf_llama(tie: bool = False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def hf_gpt2(activation: str = "gelu_new"):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=260, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                  activation_function=activation, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def our_logits(llm: LLM) -> torch.Tensor:
    with torch.no_grad():
        return llm.model(IDS)


def save_hf_bin(model, directory, shards: int = 1):
    """An HF directory with pickled weights. transformers 5 no longer writes them, so this does what
    transformers 4's ``save_pretrained(..., safe_serialization=False)`` did: ``torch.save`` of the state dict,
    split into ``pytorch_model-0000i-of-0000n.bin`` with a ``pytorch_model.bin.index.json`` when sharded."""
    model.config.save_pretrained(directory)
    byte_tokenizer().save(directory / "tokenizer.json")
    state = model.state_dict()
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    names, weight_map = list(state), {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in names[i::shards]}
        torch.save(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ---- HF pytorch_model.bin --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [hf_llama, hf_gpt2], ids=["llama", "gpt2"])
def test_hf_pytorch_model_bin_matches_transformers(tmp_path, make):
    save_hf_bin(make(), tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # HF reads the same .bin
    for source in (tmp_path, tmp_path / "pytorch_model.bin"):  # the directory, or the weights file in it
        assert (our_logits(LLM.load(source)) - hf_logits(reference)).abs().max() < 1e-4


def test_sharded_pytorch_model_bin_loads(tmp_path):
    model = hf_llama()
    save_hf_bin(model, tmp_path, shards=3)
    assert not (tmp_path / "pytorch_model.bin").exists()
    assert (our_logits(LLM.load(tmp_path)) - hf_logits(model)).abs().max() < 1e-4


class RunsCode:
    """A pickle payload: unpickling calls ``open(marker, "w")``, i.e. runs code chosen by the file's author."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_bin_that_needs_the_unsafe_unpickler_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"payload": RunsCode(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is live: the unsafe loader runs it
    assert marker.exists()
    marker.unlink()

    save_hf_bin(hf_llama(), tmp_path)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "payload": RunsCode(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelFileError, match="unsafe unpickler") as err:
        LLM.load(tmp_path)
    assert not marker.exists()
    assert "\n" not in str(err.value) and "io.open" in str(err.value)


class TrainerState:
    """A class of the training script: pickled by reference, so loading it would import and build it."""

    def __init__(self):
        self.step = 3


def test_bin_with_a_custom_class_is_refused(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "model_args": {}, "trainer": TrainerState()}, tmp_path / "ckpt.pt")
    byte_tokenizer().save(tmp_path / "tokenizer.json")
    with pytest.raises(ModelFileError, match="unsafe unpickler.*TrainerState"):
        LLM.load(tmp_path / "ckpt.pt")


def test_corrupt_or_foreign_bin_is_named(tmp_path):
    save_hf_bin(hf_llama(), tmp_path)
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(ModelFileError, match="pytorch_model.bin is not a readable PyTorch checkpoint"):
        LLM.load(tmp_path)
    weights.write_bytes(b"\x80\x02 this is not a pickle torch.save wrote")
    with pytest.raises(ModelFileError, match="not a readable PyTorch checkpoint"):
        LLM.load(tmp_path)


# ---- nanoGPT ckpt.pt ---------------------------------------------------------------------------------------------
def nanogpt_checkpoint(model, bias: bool = True, compiled: bool = False) -> dict:
    """The dict nanoGPT's train.py saves, holding ``model`` (HF GPT-2 weights in nanoGPT's layout).

    nanoGPT's GPT.from_pretrained maps HF -> nanoGPT by transposing the Conv1D weights; this is that mapping.
    Without ``bias``, nanoGPT's Linear and LayerNorm layers have no bias: the HF model's are zeroed to match.
    """
    cfg = model.config
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(".bias") and not bias:
            with torch.no_grad():
                dict(model.named_parameters())[name].zero_()
            continue
        sd[name] = tensor.t().clone() if name.endswith(conv1d) else tensor.clone()
    for i in range(cfg.n_layer):  # without flash attention nanoGPT registers its causal mask as a buffer
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(cfg.n_positions, cfg.n_positions))[None, None]
    if compiled:
        sd = {"_orig_mod." + k: v for k, v in sd.items()}
    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.n_positions,
                      bias=bias, vocab_size=cfg.vocab_size, dropout=0.0)
    params = [torch.nn.Parameter(t.detach().clone().float()) for t in sd.values() if t.is_floating_point()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    return {"model": sd, "optimizer": optimizer.state_dict(), "model_args": model_args, "iter_num": 5000,
            "best_val_loss": torch.tensor(1.4697), "config": {"batch_size": 12, "dataset": "openwebtext",
                                                              "dtype": "bfloat16", "compile": compiled}}


@pytest.mark.parametrize("bias,compiled", [(True, False), (False, True)])
def test_nanogpt_checkpoint_matches_gpt2(tmp_path, bias, compiled):
    model = hf_gpt2("gelu")  # exact GELU, as nanoGPT's nn.GELU()
    torch.save(nanogpt_checkpoint(model, bias, compiled), tmp_path / "ckpt.pt")
    byte_tokenizer().save(tmp_path / "tokenizer.json")
    for source in (tmp_path / "ckpt.pt", tmp_path):  # the file, or nanoGPT's out_dir
        llm = LLM.load(source)
        assert llm.config.bias is bias and llm.config.context_length == 128
        assert (our_logits(llm) - hf_logits(model)).abs().max() < 1e-4


def test_nanogpt_variant_with_an_untied_head_keeps_it(tmp_path):
    model = hf_gpt2("gelu")
    checkpoint = nanogpt_checkpoint(model)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))  # untie in the reference
    checkpoint["model"]["lm_head.weight"] = model.lm_head.weight.detach().clone()
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    byte_tokenizer().save(tmp_path / "tokenizer.json")
    llm = LLM.load(tmp_path)
    assert llm.config.tie_embeddings is False
    assert (our_logits(llm) - hf_logits(model)).abs().max() < 1e-4


def test_model_survives_its_checkpoint_being_rewritten(tmp_path):
    """nanoGPT's train.py saves over ckpt.pt in place; a model still mapping the old pages would die of SIGBUS."""
    model = hf_gpt2("gelu")
    torch.save(nanogpt_checkpoint(model), tmp_path / "ckpt.pt")
    byte_tokenizer().save(tmp_path / "tokenizer.json")
    llm = LLM.load(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"")  # truncated in place, as a new torch.save begins
    assert (our_logits(llm) - hf_logits(model)).abs().max() < 1e-4


def test_nanogpt_exact_gelu_survives_an_hf_export(tmp_path):
    """nanoGPT's exact GELU is kept through our HF export ("gelu", not GPT-2's "gelu_new"): HF computes the same."""
    from transformers import GPT2LMHeadModel

    from scratchlm.formats.export_hf import export_hf

    model = hf_gpt2("gelu")
    torch.save(nanogpt_checkpoint(model), tmp_path / "ckpt.pt")
    byte_tokenizer().save(tmp_path / "tokenizer.json")
    llm = LLM.load(tmp_path)
    assert llm.config.gelu_approximate == "none"
    export_hf(llm, tmp_path / "hf")
    exported = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert exported.config.activation_function == "gelu"
    assert (hf_logits(exported) - hf_logits(model)).abs().max() < 1e-4
    assert (our_logits(LLM.load(tmp_path / "hf")) - hf_logits(model)).abs().max() < 1e-4


def test_nanogpt_tokenizer_comes_from_beside_or_from_the_caller(tmp_path):
    (tmp_path / "out").mkdir()
    torch.save(nanogpt_checkpoint(hf_gpt2()), tmp_path / "out" / "ckpt.pt")
    with pytest.raises(ModelFileError, match="--tokenizer"):
        LLM.load(tmp_path / "out" / "ckpt.pt")
    byte_tokenizer().save(tmp_path / "tokenizer.json")
    for tokenizer in (tmp_path / "tokenizer.json", tmp_path):
        llm = LLM.load(tmp_path / "out" / "ckpt.pt", tokenizer=tokenizer)
        assert llm.tokenizer.encode("hi") == [104, 105]


def test_torch_file_that_is_not_nanogpt_is_named(tmp_path):
    torch.save({"weights": torch.ones(2)}, tmp_path / "model.pt")
    with pytest.raises(ModelFileError, match="not a nanoGPT checkpoint"):
        LLM.load(tmp_path / "model.pt", tokenizer=tmp_path)


# ---- litgpt lit_model.pth ----------------------------------------------------------------------------------------
def litgpt_config(model, **changes) -> dict:
    """model_config.yaml as litgpt's save_config writes it (``asdict(litgpt.Config)``) for a Llama model."""
    cfg = model.config
    out = dict(name="tiny-llama", hf_config={"name": "tiny-llama", "org": "test"}, block_size=128, n_layer=2,
               n_embd=64, vocab_size=260, padding_multiple=4, padded_vocab_size=260, norm_class_name="RMSNorm",
               norm_eps=cfg.rms_norm_eps, norm_qk=False, post_attention_norm=False, post_mlp_norm=False,
               parallel_residual=False, shared_attention_norm=False, n_head=4, head_size=16, n_query_groups=2,
               attn_bias=False, rope_base=10000, rotary_percentage=1.0, rope_condense_ratio=1,
               rope_adjustments=None, rope_interleave=False, intermediate_size=160, bias=False,
               mlp_class_name="LLaMAMLP", gelu_approximate="none", n_expert=0, n_expert_per_token=0,
               scale_embeddings=False, lm_head_bias=False, final_logit_softcapping=None, norm_1=True, norm_2=True,
               latent_attention=None, sliding_window_size=None, attention_logit_softcapping=None)
    return {**out, **changes}


def litgpt_state(model, legacy: bool = False) -> dict:
    """HF Llama -> litgpt names, as litgpt's convert_hf_checkpoint.copy_weights_llama does (q, k, v stacked);
    ``legacy``: the older ``attn.attn`` layout, interleaved per query group, that litgpt's qkv_reassemble reads."""
    hf = model.state_dict()
    sd = {"transformer.wte.weight": hf["model.embed_tokens.weight"], "transformer.ln_f.weight": hf["model.norm.weight"],
          "lm_head.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"])}
    for i in range(model.config.num_hidden_layers):
        p, lit = f"model.layers.{i}.", f"transformer.h.{i}."
        sd[lit + "norm_1.weight"] = hf[p + "input_layernorm.weight"]
        sd[lit + "norm_2.weight"] = hf[p + "post_attention_layernorm.weight"]
        q, k, v = (hf[f"{p}self_attn.{x}_proj.weight"] for x in "qkv")
        if legacy:
            groups = zip(q.chunk(2), k.chunk(2), v.chunk(2))  # 2 query groups
            sd[lit + "attn.attn.weight"] = torch.cat([torch.cat(g) for g in groups])
        else:
            sd[lit + "attn.qkv.weight"] = torch.cat((q, k, v))
        sd[lit + "attn.proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        sd[lit + "mlp.fc_1.weight"] = hf[p + "mlp.gate_proj.weight"]
        sd[lit + "mlp.fc_2.weight"] = hf[p + "mlp.up_proj.weight"]
        sd[lit + "mlp.proj.weight"] = hf[p + "mlp.down_proj.weight"]
    return {k: v.clone() for k, v in sd.items()}


def save_litgpt(model, directory, legacy: bool = False, wrapped: bool = False, **config):
    state = litgpt_state(model, legacy)
    torch.save({"model": state} if wrapped else state, directory / "lit_model.pth")
    (directory / "model_config.yaml").write_text(yaml.safe_dump(litgpt_config(model, **config)))
    byte_tokenizer().save(directory / "tokenizer.json")


@pytest.mark.parametrize("legacy,wrapped,tie", [(False, False, False), (True, True, False), (False, False, True)])
def test_litgpt_checkpoint_matches_llama(tmp_path, legacy, wrapped, tie):
    model = hf_llama(tie=tie)
    save_litgpt(model, tmp_path, legacy, wrapped)
    for source in (tmp_path, tmp_path / "lit_model.pth"):
        llm = LLM.load(source)
        assert llm.config.n_kv_heads == 2 and llm.config.tie_embeddings is tie
        assert (our_logits(llm) - hf_logits(model)).abs().max() < 1e-4


@pytest.mark.parametrize("field,value", [("parallel_residual", True), ("mlp_class_name", "GptNeoxMLP"),
                                         ("rotary_percentage", 0.25), ("norm_class_name", "LayerNorm")])
def test_litgpt_architectures_outside_llama_are_refused_with_the_reason(tmp_path, field, value):
    save_litgpt(hf_llama(), tmp_path, **{field: value})
    with pytest.raises(UnsupportedError, match=field):
        LLM.load(tmp_path)


def test_info_describes_the_pickled_kinds(tmp_path):
    (tmp_path / "hf").mkdir(), (tmp_path / "nano").mkdir(), (tmp_path / "lit").mkdir()
    save_hf_bin(hf_llama(), tmp_path / "hf")
    torch.save(nanogpt_checkpoint(hf_gpt2()), tmp_path / "nano" / "ckpt.pt")
    save_litgpt(hf_llama(), tmp_path / "lit")
    hf, nano, lit = (model_info(str(tmp_path / d)) for d in ("hf", "nano/ckpt.pt", "lit"))
    assert "pytorch_model.bin" in hf["format"] and hf["stored dtypes"] == "float32 x21"
    assert "nanoGPT" in nano["format"] and "iteration 5000" in nano["format"]
    assert nano["architecture"].startswith("gpt2-style") and nano["context length"] == "128"
    assert "litgpt" in lit["format"] and lit["heads"] == "4 (key/value 2)"


def test_cli_evaluates_a_nanogpt_checkpoint_with_a_given_tokenizer(tmp_path, capsys):
    from scratchlm.cli import main

    (tmp_path / "out").mkdir()
    torch.save(nanogpt_checkpoint(hf_gpt2()), tmp_path / "out" / "ckpt.pt")
    byte_tokenizer().save(tmp_path / "tokenizer.json")
    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 3, encoding="utf-8")
    argv = ["eval", "perplexity", str(tmp_path / "out" / "ckpt.pt"), str(text), "--no-progress"]
    assert main(argv) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main([*argv, "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")
    assert main(["info", str(tmp_path / "out" / "ckpt.pt")]) == 0
    assert "nanoGPT checkpoint (iteration 5000" in capsys.readouterr().out
