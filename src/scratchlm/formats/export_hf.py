"""Write a model as a Hugging Face transformers directory (Llama or GPT-2), the inverse of ``formats/hf.py``.

    config.json              LlamaConfig or GPT2Config fields, ``architectures``, ``torch_dtype``
    model.safetensors        HF parameter names (GPT-2: fused ``c_attn``, Conv1D weights [in, out])
    tokenizer.json           scratchlm's tokenizer in HF ``tokenizers`` form (``Tokenizer.save``)
    tokenizer_config.json    chat template, special tokens, ``tokenizer_class`` for ``AutoTokenizer``
    special_tokens_map.json  bos / eos / pad token texts (older transformers read them from here)
    generation_config.json   bos / eos / pad ids

``AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)`` load it offline
and compute what scratchlm computes (``tests/test_export_hf.py``); so do vLLM and other HF-format tools.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scratchlm.config import ModelConfig
from scratchlm.files import atomic_dir
from scratchlm.formats.export_common import check_dense, export_architecture, fuse_gpt2_qkv
from scratchlm.formats.hf import hf_name_map

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def special_token_ids(llm) -> dict[str, int | list[int] | None]:
    """bos / eos / pad ids as HF configs write them (pad is eos, as in SmolLM2; eos may be a list)."""
    tok = llm.tokenizer
    eos = sorted(llm.eos_ids) if llm.eos_ids else []
    eos_id: int | list[int] | None = None
    if tok.eos_id is not None:
        eos_id = tok.eos_id if eos == [tok.eos_id] else [tok.eos_id] + [i for i in eos if i != tok.eos_id]
    elif eos:
        eos_id = eos[0] if len(eos) == 1 else eos
    return {"bos_token_id": tok.bos_id, "eos_token_id": eos_id, "pad_token_id": tok.eos_id}


def hf_config(config: ModelConfig, llm, dtype: torch.dtype) -> dict:
    """The ``config.json`` dict for this model (LlamaConfig or GPT2Config fields)."""
    arch = export_architecture(config)
    dtype_name = DTYPE_NAMES[dtype]
    common = {"vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings,
              # transformers < 4.56 reads "torch_dtype", later versions "dtype".
              "torch_dtype": dtype_name, "dtype": dtype_name, "use_cache": True, **special_token_ids(llm)}
    if arch == "llama":
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": config.d_model, "intermediate_size": config.d_ff,
            "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
            "max_position_embeddings": config.context_length, "rms_norm_eps": config.norm_eps,
            # transformers 4 reads rope_theta; 5 reads rope_parameters.
            "rope_theta": config.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "rope_scaling": None, "attention_bias": config.bias, "mlp_bias": config.bias,
            "attention_dropout": 0.0, "pretraining_tp": 1, "initializer_range": 0.02, **common,
        }
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_embd": config.d_model, "n_layer": config.n_layers, "n_head": config.n_heads,
        "n_inner": config.d_ff, "n_positions": config.context_length, "n_ctx": config.context_length,
        "activation_function": "gelu_new" if config.gelu_approximate == "tanh" else "gelu",
        "layer_norm_epsilon": config.norm_eps,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "initializer_range": 0.02,
        **common,
    }


def to_hf_state_dict(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical tensors -> HF tensors, the inverse of ``hf.from_hf_state_dict``.

    GPT-2: q/k/v are fused into ``c_attn`` (missing biases become zeros, see ``fuse_gpt2_qkv``) and linear
    weights are transposed to Conv1D's [in, out].
    """
    arch = export_architecture(config)
    to_hf = {ours: theirs for theirs, ours in hf_name_map(config).items()}
    state = dict(state)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # HF re-ties it from tie_word_embeddings
    if arch == "gpt2":
        state = fuse_gpt2_qkv(config, state)
    hf_state = {}
    for ours, tensor in state.items():
        theirs = to_hf[ours]
        if arch == "gpt2" and ".h." in theirs and theirs.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.t()  # Conv1D stores [in, out]
        hf_state[theirs] = tensor.contiguous()
    return hf_state


def tokenizer_config(llm) -> dict:
    """``tokenizer_config.json``: special tokens, chat template and the class ``AutoTokenizer`` builds."""
    tok = llm.tokenizer
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for t, i in sorted(tok.special_tokens.items(), key=lambda item: item[1])}
    return {
        # The fast tokenizer reads tokenizer.json as it is (a model-specific class could rebuild the
        # pre-tokenizer from its own defaults, which would change the ids of our "smollm"/"gpt4" splits).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.eos_token, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": llm.config.context_length, "added_tokens_decoder": added,
        "chat_template": llm.template.source,
    }


def export_hf(llm, out: str | Path, dtype: torch.dtype = torch.float32, force: bool = False) -> Path:
    """Write ``llm`` (an ``LLM``) as an HF transformers directory at ``out``; returns its path.

    ``dtype`` is the dtype of the stored weights. The directory appears only when complete.
    """
    from safetensors.torch import save_file

    from scratchlm.files import atomic_write_json

    config = llm.config
    export_architecture(config)  # refuse before creating anything
    check_dense(llm)
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype}")
    state = {k: v.detach().cpu().to(dtype) if v.is_floating_point() else v.detach().cpu()
             for k, v in llm.model.canonical_state_dict().items()}
    hf_state = to_hf_state_dict(config, state)
    out = Path(out)
    with atomic_dir(out, force) as tmp:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_config(config, llm, dtype))
        llm.tokenizer.save(tmp / "tokenizer.json")
        atomic_write_json(tmp / "tokenizer_config.json", tokenizer_config(llm))
        ids = special_token_ids(llm)
        atomic_write_json(tmp / "generation_config.json",
                          {k: v for k, v in ids.items() if v is not None} | {"_from_model_config": False})
        tok = llm.tokenizer
        atomic_write_json(tmp / "special_tokens_map.json", {
            k: v for k, v in (("bos_token", tok.bos_token), ("eos_token", tok.eos_token),
                              ("pad_token", tok.eos_token)) if v is not None})
    return out
