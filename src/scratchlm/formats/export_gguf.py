"""Write a model as a GGUF file that llama.cpp (and Ollama, LM Studio, HF transformers) loads.

The inverse of ``formats/gguf.py``, through the ``gguf`` package's ``GGUFWriter``:

- metadata: architecture (``llama`` or ``gpt2``) and its hyperparameters; the tokenizer as llama.cpp
  stores a byte-level BPE (model ``gpt2``, tokens, token types, merges, special ids, and the name of the
  pre-tokenizer regex in ``tokenizer.ggml.pre``); the chat template;
- tensors in llama.cpp's layout: GGUF names, Q/K rows of Llama models permuted back to llama.cpp's
  interleaved rotary order (``permute_qk``), GPT-2's Q/K/V fused into ``attn_qkv``;
- tensor types: 1-D tensors (norms, biases) and learned positions stay F32, as in llama.cpp's converter;
  matrices are F32, F16, or quantized here (``ggml_quants``) to Q8_0, Q4_0 or Q4_1. With the 4-bit
  types the token embedding (also the output head when tied) is Q8_0, as in the SmolLM2 file we pull:
  4 bits there cost the most quality for the least size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import UnsupportedError
from scratchlm.files import atomic_file
from scratchlm.formats.export_common import check_dense, export_architecture, fuse_gpt2_qkv
from scratchlm.formats.ggml_quants import BLOCK_SIZE, quantize
from scratchlm.formats.gguf import GGUF_BLOCK_NAMES, GGUF_FIXED_NAMES, permute_qk

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
# general.file_type values (llama.cpp's llama_ftype).
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}
# llama.cpp's names (tokenizer.ggml.pre, see llama-vocab.cpp) for the regexes of our pre-tokenizers.
# "gpt4": llama.cpp's "dbrx" (DBRX uses GPT-4's cl100k tokenizer) runs the same split, written without
# (?i) and possessive quantifiers; "llama-bpe" has that regex too but also makes llama.cpp skip BPE for
# whole-word vocabulary hits and add a BOS token, so it would not reproduce our ids.
GGUF_PRE_NAMES = {"gpt2": "gpt-2", "smollm": "smollm", "gpt4": "dbrx"}
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
GGUF_TOKEN_TYPE_NORMAL = 1
GGUF_TOKEN_TYPE_CONTROL = 3  # special tokens: matched in text before BPE, never merged
GGUF_TOKEN_TYPE_UNUSED = 5  # placeholders for ids the tokenizer does not use (llama.cpp's "[PAD{i}]")


def gguf_tensor_name(name: str) -> str:
    """Canonical tensor name -> GGUF name (``blocks.3.attn.q_proj.weight`` -> ``blk.3.attn_q.weight``)."""
    fixed = {ours: theirs for theirs, ours in GGUF_FIXED_NAMES.items() if ours is not None}
    if name in fixed:
        return fixed[name]
    block = {ours: theirs for theirs, ours in GGUF_BLOCK_NAMES.items()}
    _, index, *middle, suffix = name.split(".")
    return f"blk.{index}.{block['.'.join(middle)]}.{suffix}"


def gguf_tensors(config: ModelConfig, state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor in llama.cpp's layout) for every tensor, embeddings first."""
    arch = export_architecture(config)
    state = {k: v.detach().cpu().float() for k, v in state.items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp falls back to token_embd when output is absent
    if arch == "gpt2":
        state = fuse_gpt2_qkv(config, state)
    else:
        # llama.cpp's converter interleaves the rotary halves of each Q/K head (weights and biases).
        for i in range(config.n_layers):
            for proj, heads in (("q_proj", config.n_heads), ("k_proj", config.n_kv_heads)):
                for kind in ("weight", "bias"):
                    key = f"blocks.{i}.attn.{proj}.{kind}"
                    if key in state:
                        state[key] = permute_qk(state[key], heads)

    def order(name: str) -> tuple[int, str]:
        parts = name.split(".")
        if parts[0] == "blocks":
            return (1 + int(parts[1]), name)
        return (0 if "embeddings" in name else 10**9, name)

    return [(gguf_tensor_name(k), state[k]) for k in sorted(state, key=order)]


def tensor_kind(gguf_name: str, tensor: torch.Tensor, gguf_type: str) -> str:
    """The storage type of one tensor for a requested file type (see the module docstring)."""
    if tensor.ndim == 1 or gguf_type == "f32" or gguf_name == "position_embd.weight":
        return "f32"
    if gguf_type in ("q4_0", "q4_1") and gguf_name in ("token_embd.weight", "output.weight"):
        return "q8_0"
    return gguf_type


def check_quantizable(tensors: list[tuple[str, torch.Tensor]], gguf_type: str) -> None:
    """Refuse a block format when some matrix's rows do not split into blocks of 32, saying which."""
    for name, t in tensors:
        kind = tensor_kind(name, t, gguf_type)
        if kind.startswith("q") and t.shape[-1] % BLOCK_SIZE:
            raise UnsupportedError(
                f"--gguf-type {gguf_type} stores rows in blocks of {BLOCK_SIZE} values, but tensor {name} has rows "
                f"of {t.shape[-1]} values (a multiple of {BLOCK_SIZE} is needed); export as f16 or f32 instead"
            )


def tokenizer_tables(llm) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for every id of the embedding (holes become placeholders)."""
    tok, n_vocab = llm.tokenizer, llm.config.vocab_size
    if tok.vocab_size > n_vocab:
        raise UnsupportedError(
            f"the tokenizer has ids up to {tok.vocab_size - 1} but the model's embedding has only {n_vocab} rows"
        )
    specials = set(tok.special_tokens.values())
    tokens, types = [], []
    for i in range(n_vocab):
        text = tok.id_to_token(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(GGUF_TOKEN_TYPE_UNUSED)
        else:
            tokens.append(text)
            types.append(GGUF_TOKEN_TYPE_CONTROL if i in specials else GGUF_TOKEN_TYPE_NORMAL)
    return tokens, types


def _add_metadata(writer, llm, arch: str, gguf_type: str) -> None:
    import gguf

    cfg, tok = llm.config, llm.tokenizer
    writer.add_type("model")
    writer.add_name(llm.name)
    writer.add_file_type(FILE_TYPES[gguf_type])
    if gguf_type.startswith("q"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    if arch == "llama":
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(cfg.head_dim)
        if not cfg.default_head_dim:  # heads removed by structured pruning: llama.cpp's n_embd_head_k/v
            writer.add_key_length(cfg.head_dim)
            writer.add_value_length(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
    else:
        writer.add_layer_norm_eps(cfg.norm_eps)

    tokens, types = tokenizer_tables(llm)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(GGUF_PRE_NAMES[tok.pretokenizer])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in tok.merges])
    if tok.bos_id is not None:
        writer.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        writer.add_eos_token_id(tok.eos_id)
        writer.add_pad_token_id(tok.eos_id)
    writer.add_add_bos_token(False)  # scratchlm never prepends BOS; the chat template writes what it needs
    writer.add_add_eos_token(False)
    writer.add_chat_template(llm.template.source)


def export_gguf(llm, out: str | Path, gguf_type: str = "f16", force: bool = False) -> Path:
    """Write ``llm`` (an ``LLM``) as a GGUF file at ``out`` with matrices stored as ``gguf_type``.

    The file appears only when complete; nothing is written when the model or type cannot be exported.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise UnsupportedError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    arch = export_architecture(llm.config)
    check_dense(llm)
    tensors = gguf_tensors(llm.config, llm.model.canonical_state_dict())
    check_quantizable(tensors, gguf_type)
    tokenizer_tables(llm)  # refuse a tokenizer larger than the embedding before creating the file
    if not llm.tokenizer.merges:
        # llama.cpp refuses a BPE vocabulary without tokenizer.ggml.merges, and GGUF has no empty arrays.
        raise UnsupportedError("the tokenizer has no BPE merges (bytes only); llama.cpp's GGUF tokenizer needs "
                               "at least one merge: train a BPE tokenizer for this model first")
    out = Path(out)
    with atomic_file(out, force) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _add_metadata(writer, llm, arch, gguf_type)
        for name, t in tensors:
            kind = tensor_kind(name, t, gguf_type)
            if kind == "f32":
                writer.add_tensor(name, t.numpy())
            elif kind == "f16":
                writer.add_tensor(name, t.to(torch.float16).numpy())
            else:
                writer.add_tensor(name, quantize(t, kind), raw_dtype=gguf.GGMLQuantizationType[kind.upper()])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out

