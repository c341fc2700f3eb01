"""Read HF BERT directories (``BertModel``: sentence-transformers' encoders among them) into canonical form.

HF's names, layer by layer, and ours (see ``scratchlm.model`` for the canonical list)::

    embeddings.word_embeddings            tok_embeddings
    embeddings.position_embeddings        pos_embeddings
    embeddings.token_type_embeddings      type_embeddings
    embeddings.LayerNorm                  embed_norm
    encoder.layer.N.attention.self.query  blocks.N.attn.q_proj      (key -> k_proj, value -> v_proj)
    encoder.layer.N.attention.output.dense      blocks.N.attn.o_proj
    encoder.layer.N.attention.output.LayerNorm  blocks.N.attn_norm  (post-norm: after the residual add)
    encoder.layer.N.intermediate.dense    blocks.N.mlp.up_proj
    encoder.layer.N.output.dense          blocks.N.mlp.down_proj
    encoder.layer.N.output.LayerNorm      blocks.N.mlp_norm

Task heads (``pooler``, the masked-LM ``cls.*`` head) are not part of the encoder and are skipped;
sentence-transformers pools the hidden states itself (``scratchlm.encoder``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import ModelFileError, UnsupportedError
from scratchlm.files import read_json

BERT_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForPreTraining")
# transformers' ACT2FN names -> the ``approximate`` argument of torch's gelu
_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def is_bert_config(hf: dict[str, Any]) -> bool:
    """Whether an HF ``config.json`` dict describes a BERT encoder."""
    archs = hf.get("architectures") or []
    return hf.get("model_type") == "bert" or any(a in BERT_ARCHITECTURES for a in archs)


def config_from_bert(hf: dict[str, Any], name: str = "bert") -> ModelConfig:
    """The ModelConfig of an HF BERT ``config.json`` dict."""
    act = hf.get("hidden_act", "gelu")
    if act not in _GELU:
        raise UnsupportedError(f"BERT with activation {act!r} is not supported (only {', '.join(_GELU)})")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedError(f"BERT with {hf['position_embedding_type']!r} positions is not supported "
                               "(only absolute)")
    return ModelConfig(
        name=name, vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"],
        d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"], positions="learned", norm="layernorm", mlp="gelu", bias=True,
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)), tie_embeddings=True, causal=False,
        norm_position="post", type_vocab_size=int(hf.get("type_vocab_size", 2)), gelu_approximate=_GELU[act],
    )


def bert_name_map(n_layers: int) -> dict[str, str]:
    """HF BERT parameter name -> canonical name, for every encoder parameter."""
    names = {"embeddings.word_embeddings.weight": "tok_embeddings.weight",
             "embeddings.position_embeddings.weight": "pos_embeddings.weight",
             "embeddings.token_type_embeddings.weight": "type_embeddings.weight"}
    for kind in ("weight", "bias"):
        names[f"embeddings.LayerNorm.{kind}"] = f"embed_norm.{kind}"
        for i in range(n_layers):
            hf, ours = f"encoder.layer.{i}.", f"blocks.{i}."
            names.update({
                f"{hf}attention.self.query.{kind}": f"{ours}attn.q_proj.{kind}",
                f"{hf}attention.self.key.{kind}": f"{ours}attn.k_proj.{kind}",
                f"{hf}attention.self.value.{kind}": f"{ours}attn.v_proj.{kind}",
                f"{hf}attention.output.dense.{kind}": f"{ours}attn.o_proj.{kind}",
                f"{hf}attention.output.LayerNorm.{kind}": f"{ours}attn_norm.{kind}",
                f"{hf}intermediate.dense.{kind}": f"{ours}mlp.up_proj.{kind}",
                f"{hf}output.dense.{kind}": f"{ours}mlp.down_proj.{kind}",
                f"{hf}output.LayerNorm.{kind}": f"{ours}mlp_norm.{kind}",
            })
    return names


def _hf_key(key: str) -> str:
    """Drop the ``bert.`` prefix of task models and the TF-era LayerNorm names (gamma, beta)."""
    key = key.removeprefix("bert.")
    if ".LayerNorm." in key:
        key = key.replace(".LayerNorm.gamma", ".LayerNorm.weight").replace(".LayerNorm.beta", ".LayerNorm.bias")
    return key


def from_bert_state_dict(config: ModelConfig, hf_state: dict[str, torch.Tensor],
                         source: str = "weights") -> dict[str, torch.Tensor]:
    """Rename HF BERT tensors to canonical names; task heads and buffers are dropped, anything else refused."""
    names = bert_name_map(config.n_layers)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        key = _hf_key(key)
        if key in names:
            state[names[key]] = tensor.contiguous()
        elif not key.startswith(("pooler.", "cls.", "embeddings.position_ids")):
            raise ModelFileError(f"{source}: unexpected BERT tensor {key!r}")
    missing = sorted(set(names.values()) - set(state))
    if missing:
        raise ModelFileError(f"{source}: BERT tensors missing for {missing[:5]}")
    return state


def load_bert(directory: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF BERT directory: (config, canonical state dict in ``dtype``)."""
    from scratchlm.formats.hf import read_weights

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelFileError(f"{directory} has no config.json: not an HF model directory")
    hf = read_json(config_path)
    if not is_bert_config(hf):
        raise UnsupportedError(f"{config_path} describes {hf.get('architectures') or hf.get('model_type')!r}, "
                               "not a BERT encoder")
    config = config_from_bert(hf, name=directory.name)
    state = from_bert_state_dict(config, read_weights(directory), source=str(directory))
    return config, {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
