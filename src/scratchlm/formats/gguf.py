"""Read GGUF files (llama.cpp's format) into scratchlm's canonical representation.

The container is walked by ``formats.gguf_file``; float, Q8_0 and Q4_0/Q4_1 tensors are read with torch
(``formats.ggml_quants``, bit for bit what the `gguf` package computes), the other block types are dequantized by
the `gguf` package, llama.cpp's own.
What is ours is the mapping: GGUF metadata -> ModelConfig, GGUF tensor names -> canonical names, and undoing
llama.cpp's reordering of the Q and K rows (its converter interleaves the two rotary halves of each head).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import ModelFileError, UnsupportedError

# Tensor types we dequantize (the gguf package does the arithmetic); others are refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                   "Q5_K", "Q6_K")
ARCHITECTURES = ("llama", "gpt2")


def read_gguf(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Open a GGUF file; returns the file (``.tensors``: mapped tensor records) and its metadata as plain
    Python values (``formats.gguf_file``: our own walk of the header, 30x faster than the gguf package's
    reader on SmolLM2's 150,000 vocabulary strings). Anything unreadable becomes a ModelFileError naming it."""
    from scratchlm.formats.gguf_file import GGUFFile

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"GGUF file not found: {path}")
    try:
        file = GGUFFile(path)
    except (ValueError, OSError, UnicodeDecodeError, struct.error) as exc:
        raise ModelFileError(f"{path} is not a readable GGUF file (truncated or corrupt?): {exc}") from None
    return file, file.metadata


def config_from_gguf(meta: dict[str, Any], name: str = "gguf") -> ModelConfig:
    """The ModelConfig that GGUF metadata describes (``llama`` or ``gpt2`` architecture)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedError(
            f"unsupported GGUF architecture {arch!r}; scratchlm reads {', '.join(ARCHITECTURES)}"
        )

    def get(key: str, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelFileError(f"GGUF metadata lacks {arch}.{key}")
        return value

    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    n_heads = int(get("attention.head_count"))
    common = dict(
        name=name, vocab_size=int(vocab), context_length=int(get("context_length")),
        d_model=int(get("embedding_length")), n_layers=int(get("block_count")), n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)), d_ff=int(get("feed_forward_length")),
    )
    if arch == "gpt2":
        return ModelConfig(**common, positions="learned", norm="layernorm", mlp="gelu", bias=True,
                           norm_eps=float(get("attention.layer_norm_epsilon")), tie_embeddings=True)
    if meta.get("llama.rope.scaling.type") not in (None, "none"):
        raise UnsupportedError(f"RoPE scaling {meta['llama.rope.scaling.type']!r} is not supported")
    # attention.key_length: the head size when the heads do not tile the embedding (a structured-pruned model)
    head_dim = int(meta.get("llama.attention.key_length") or common["d_model"] // n_heads)
    if int(meta.get("llama.attention.value_length") or head_dim) != head_dim:
        raise UnsupportedError("attention.value_length != attention.key_length is not supported")
    if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedError("partial rotary embeddings (rope.dimension_count != head size) are not supported")
    return ModelConfig(**common, head_dim=head_dim, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                       norm_eps=float(get("attention.layer_norm_rms_epsilon")),
                       rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)), tie_embeddings=True)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: within each head, rows (0, 1, 2, 3, ...) hold the pairs
    (x0, x_{D/2}), (x1, x_{D/2+1}), ... interleaved; HF's rotate-half layout keeps the halves apart."""
    out_dim = w.shape[0]
    d = out_dim // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``unpermute_qk``: HF rotate-half rows -> llama.cpp interleaved rows."""
    out_dim = w.shape[0]
    d = out_dim // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tensor_to_torch(t, path: Path) -> torch.Tensor:
    """One tensor of the file as float32 (float types, Q8_0, Q4_0 and Q4_1 natively; others through gguf)."""
    from scratchlm.formats.ggml_quants import NATIVE_BLOCK_TYPES, dequantize_blocks

    kind = t.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise UnsupportedError(
            f"{path}: tensor {t.name} has quantization type {kind}, which scratchlm does not read; "
            f"supported: {', '.join(SUPPORTED_TYPES)}"
        )
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest-moving dimension first
    if kind == "F32":
        return torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(shape)  # a copy: the file stays mapped
    if kind == "F16":
        return torch.from_numpy(t.data.astype(np.float32)).reshape(shape)
    if kind == "BF16":  # raw bytes, two per value: a bfloat16 is the top half of a float32
        words = np.ascontiguousarray(t.data).view("<u2").astype(np.uint32) << 16
        return torch.from_numpy(words.view(np.float32)).reshape(shape)
    if kind in NATIVE_BLOCK_TYPES:
        cols = shape[-1]
        return dequantize_blocks(t.data, kind, t.n_elements // cols, cols).reshape(shape)
    from gguf import quants

    array = quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(shape))


# GGUF tensor name -> canonical name, shared by the loader and by ``export_gguf`` (which inverts it).
# None marks tensors we derive ourselves (rope_freqs).
GGUF_FIXED_NAMES: dict[str, str | None] = {
    "token_embd.weight": "tok_embeddings.weight", "position_embd.weight": "pos_embeddings.weight",
    "output_norm.weight": "final_norm.weight", "output_norm.bias": "final_norm.bias",
    "output.weight": "lm_head.weight", "rope_freqs.weight": None,
}
# Per-block names: ``blk.{i}.<gguf>.{weight,bias}`` <-> ``blocks.{i}.<canonical>.{weight,bias}``.
# ``attn.qkv`` is GPT-2's fused Q/K/V tensor, split into q/k/v_proj on load.
GGUF_BLOCK_NAMES: dict[str, str] = {
    "attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_qkv": "attn.qkv",
}


def _canonical_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> canonical name (None for tensors we derive ourselves, like rope_freqs)."""
    if gguf_name in GGUF_FIXED_NAMES:
        return GGUF_FIXED_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if parts[0] != "blk" or len(parts) != 4 or parts[2] not in GGUF_BLOCK_NAMES:
        raise UnsupportedError(f"unexpected GGUF tensor {gguf_name}")
    return f"blocks.{parts[1]}.{GGUF_BLOCK_NAMES[parts[2]]}.{parts[3]}"


# Tensor types that are stored unquantized; a GGUF whose linear layers use any other type is a quantized model.
FLOAT_TYPES = ("F32", "F16", "BF16")


def is_quantized_gguf(reader) -> bool:
    """True when the file's linear-layer weights are block-quantized (Q4_1, Q8_0, K-quants...), not float."""
    return any(t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2
               and t.tensor_type.name not in FLOAT_TYPES for t in reader.tensors)


def load_gguf(path: str | Path,
              dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """Read a GGUF model: (config, canonical state dict in ``dtype``, metadata)."""
    path = Path(path)
    reader, meta = read_gguf(path)
    return _read_tensors(reader, meta, path, dtype, keep_int4=False) + (meta,)


def load_gguf_quantized(path: str | Path, dtype: torch.dtype = torch.float32,
                        ) -> tuple[ModelConfig, dict[str, torch.Tensor], dict, bool]:
    """Like ``load_gguf``, but a block-quantized file (``is_quantized_gguf``) keeps its 4-bit layers: those stored
    as Q4_0, Q4_1 or Q4_K come back in scratchlm's portable int4 format at group size 32 (``<name>.qweight``,
    ``.scales``, ``.mins`` instead of ``<name>.weight``; exact, see ``ggml_quants.int4_from_blocks``).
    Returns (config, state, metadata, whether the file is quantized)."""
    path = Path(path)
    reader, meta = read_gguf(path)
    quantized = is_quantized_gguf(reader)
    return _read_tensors(reader, meta, path, dtype, keep_int4=quantized) + (meta, quantized)


def _read_tensors(reader, meta: dict, path: Path, dtype: torch.dtype,
                  keep_int4: bool) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from scratchlm.formats.ggml_quants import INT4_BLOCK_TYPES, int4_from_blocks

    config = config_from_gguf(meta, name=path.stem)
    state: dict[str, torch.Tensor] = {}

    def place(name: str, w: torch.Tensor) -> None:
        # llama.cpp's converter permutes the Q/K rows (and biases: Llama variants with attention biases).
        if name.rpartition(".")[0].endswith("q_proj") and config.positions == "rope":
            w = unpermute_qk(w, config.n_heads)
        elif name.rpartition(".")[0].endswith("k_proj") and config.positions == "rope":
            w = unpermute_qk(w, config.n_kv_heads)
        if ".attn.qkv." in name:  # GPT-2 keeps Q, K and V in one fused tensor
            for part, chunk in zip("qkv", w.chunk(3, dim=0)):
                state[name.replace(".qkv.", f".{part}_proj.")] = chunk.to(dtype).contiguous() \
                    if chunk.is_floating_point() else chunk.contiguous()
            return
        state[name] = w.to(dtype) if w.is_floating_point() and w.dtype != dtype else w

    from scratchlm.quant.quantize import return_freed_memory

    try:
        for i, t in enumerate(reader.tensors):
            if keep_int4 and i % 16 == 15:
                return_freed_memory()  # glibc keeps the freed temporaries of each tensor's conversion otherwise
            name = _canonical_name(t.name)
            if name is None:
                continue
            kind = t.tensor_type.name
            if keep_int4 and kind in INT4_BLOCK_TYPES and name.startswith("blocks.") and name.endswith(".weight"):
                rows, cols = (int(n) for n in reversed(t.shape))
                for part, tensor in zip(("qweight", "scales", "mins"), int4_from_blocks(t.data, kind, rows, cols)):
                    place(name.removesuffix("weight") + part, tensor)
                continue
            if keep_int4 and kind not in FLOAT_TYPES and len(t.shape) == 2:
                for part, tensor in zip(("qweight", "scales"), _int8_rows(t)):
                    place(name.removesuffix("weight") + part, tensor)
                continue
            place(name, _tensor_to_torch(t, path))
    except (ValueError, IndexError, TypeError) as exc:
        raise ModelFileError(f"{path}: tensor data is unreadable (truncated or corrupt?): {exc}") from None
    if config.positions == "rope" and any(k.endswith("_proj.bias") for k in state):
        config = config.replace(bias=True)  # a Llama variant with linear biases (llama.cpp reads them too)
    if config.tie_embeddings and any(k.startswith("lm_head.") for k in state):
        # the head is stored as a float matrix, or as int8 rows (keep_int4): tied when it equals the embedding
        parts = ("weight",) if "lm_head.weight" in state else ("qweight", "scales")
        head, table = [state.get(f"lm_head.{p}") for p in parts], [state.get(f"tok_embeddings.{p}") for p in parts]
        if all(t is not None and h.shape == t.shape and torch.equal(h, t) for h, t in zip(head, table)):
            for p in parts:
                del state[f"lm_head.{p}"]
        else:
            config = config.replace(tie_embeddings=False)
    return config, state


def _int8_rows(t, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """A block-quantized matrix (Q8_0, Q5, Q6_K, ...) as scratchlm's int8 rows (``quant.int8``: one scale per
    row, not exact), dequantized a few thousand rows at a time so that the float copy never exists whole."""
    from scratchlm.formats.ggml_quants import NATIVE_BLOCK_TYPES, dequantize_blocks
    from scratchlm.quant.int8 import quantize_int8

    kind, cols = t.tensor_type.name, int(t.shape[0])
    data = np.asarray(t.data)

    def rows_of(part: np.ndarray) -> torch.Tensor:
        if kind in NATIVE_BLOCK_TYPES:
            return dequantize_blocks(part, kind, part.shape[0], cols)
        from gguf import quants

        return torch.from_numpy(np.ascontiguousarray(quants.dequantize(part, t.tensor_type),
                                                     dtype=np.float32).reshape(-1, cols))

    parts = [quantize_int8(rows_of(data[i : i + chunk])) for i in range(0, data.shape[0], chunk)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])
