"""Quantize a whole Transformer by swapping modules, and rebuild one from portable tensors.

    quantize_model(model, "int4", group_size=64)   # in place: every nn.Linear -> Int4Linear, embedding too
    fuse_projections(model)                        # (done by both) q/k/v and gate/up as one product each
    quantized_state_dict(model)                    # portable tensors under canonical names (for files)
    build_quantized_model(config, tensors, info)   # the inverse, used when loading a quantized checkpoint

Names in the portable state dict follow the canonical ones of ``model.py``: the ``.weight`` of a quantized
layer is replaced by ``.qweight`` and ``.scales`` (int8), plus ``.mins`` (int4); biases and norms stay float.
A tied LM head is stored once, as the embedding.
"""

from __future__ import annotations

import ctypes
from collections.abc import MutableMapping

import torch
from torch import nn

from scratchlm.config import ModelConfig
from scratchlm.errors import ConfigError, ModelFileError
from scratchlm.quant.embedding import QuantEmbedding
from scratchlm.quant.int4 import BITS, CHANNEL, GROUP_SIZES, Int4Linear, check_group_size
from scratchlm.quant.int8 import Int8Linear

MODES = ("int8", "int4")
# 32: a Q4_1 GGUF (SmolLM2's) stores its layers in groups of 32 with a min and a step, so group 32 recovers
# those weights exactly; requantizing them in groups of 64 cost +37% perplexity on SmolLM2 (measured).
DEFAULT_GROUP_SIZE = 32
QUANT_MODULES = (Int8Linear, Int4Linear, QuantEmbedding)


def quantization_of(model: nn.Module) -> dict | None:
    """``{"mode", "group_size"}`` of a quantized model, None for a float one."""
    info = getattr(model, "quantization", None)
    if info is None and any(isinstance(m, QUANT_MODULES) for m in model.modules()):
        info = {"mode": "unknown", "group_size": None}
    return info


def check_options(mode: str, group_size: int | str | None, bits: int = 4) -> int | str | None:
    """Validate a mode, group size and bit width; returns the group size to use (None for int8)."""
    if mode not in MODES:
        raise ConfigError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "int8":
        if group_size is not None:
            raise ConfigError("int8 uses one scale per output channel: --group-size applies to int4 only")
        if bits != 4:  # 4 is the default, i.e. not given
            raise ConfigError("int8 has 8 bits: --bits applies to int4 only (4 or 3)")
        return None
    if bits not in BITS:
        raise ConfigError(f"unsupported bit width {bits} for int4; choose one of {', '.join(map(str, BITS))}")
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    check_group_size(group_size)
    return group_size


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def quantize_model(model: nn.Module, mode: str = "int4", group_size: int | str | None = None,
                   embeddings: bool = True, progress: bool = False, bits: int = 4,
                   int4_layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None) -> nn.Module:
    """Quantize ``model``'s linear layers (and its token embedding, when ``embeddings``) in place.

    ``mode`` is "int8" (per output channel) or "int4" (group-wise, ``group_size`` 32, 64, 128 or "channel",
    default 32; ``bits=3`` puts 3-bit codes in the int4 container). Round to nearest, except the layers named
    in ``int4_layers``, whose portable int4 tensors were computed elsewhere (GPTQ, ``quant.gptq``).
    The LM head and the token embedding are int8 in both modes: in int4 the head alone cost SmolLM2 +11%
    perplexity (measured), and it is what llama.cpp's Q4 files do too (their embedding table is Q8_0).
    ``progress``: a bar on stderr, one step per layer. Returns the model.
    """
    from scratchlm.progress import bar

    if quantization_of(model) is not None:
        info = quantization_of(model)
        raise ConfigError(f"this model is already quantized ({info['mode']}); quantizing twice would only add "
                          "error: load the float model and quantize that")
    group_size = check_options(mode, group_size, bits)
    dtype = _float_dtype(model)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if mode == "int4":  # check every layer before changing any
        for name, m in linears:
            check_group_size(group_size, m.in_features, name)
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    emb = getattr(model, "tok_embeddings", None)
    with torch.no_grad():
        if embeddings and isinstance(emb, nn.Embedding):
            model.tok_embeddings = QuantEmbedding.from_embedding(emb, 8, None, dtype)
        for name, m in bar(linears, f"quantizing to {mode}", progress, unit="layer"):
            if tied and name == "lm_head" and embeddings:
                q = model.tok_embeddings  # the head is the embedding: share its int8 tensor
                new = Int8Linear(q.qweight, q.scales, None, dtype)
            elif mode == "int8" or name == "lm_head":
                new = Int8Linear.from_linear(m, dtype)
            elif int4_layers and name in int4_layers:
                new = Int4Linear(*int4_layers[name], group_size, m.bias, dtype)
            else:
                new = Int4Linear.from_linear(m, group_size, dtype, bits)
            model.set_submodule(name, new)
    model.quantization = {"mode": mode, "group_size": group_size, "embeddings": bool(embeddings),
                          **({"bits": bits} if mode == "int4" and bits != 4 else {})}
    return fuse_projections(model)


# Projections that read the same input, computed as one product: a layer's q, k and v, and its SwiGLU gate
# and up. Decoding SmolLM2 then makes 4 kernel calls per layer instead of 7, and the larger products run
# closer to the memory's speed (int4, 2 threads: 86 -> 69 us per layer, benchmarks/quant_kernels.py).
# Rows of a quantized matrix are independent (their own scales), so stacking the rows of the parts is exact.
FUSED_PROJECTIONS = {"attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
                     "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}


def return_freed_memory() -> None:
    """Give the allocator's freed pages back to the system (glibc keeps them; elsewhere this does nothing).

    Building quantized layers frees many temporaries of a few MiB (file copies, unpacked codes); glibc keeps
    most of them in the process although nothing uses them: loading int4 SmolLM2 peaked at 641 MiB RSS when
    trimmed once at the end, at 444 MiB trimmed every 8 layers (measured; 221 MiB of it is ``import torch``).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _portable_dict(layer: nn.Module) -> dict[str, torch.Tensor]:
    tensors = layer.portable()
    return tensors if isinstance(tensors, dict) else dict(zip(("qweight", "scales", "mins"), tensors))


def fuse_projections(model: nn.Module) -> nn.Module:
    """Replace each layer's quantized q/k/v (and gate/up) by one quantized layer holding their rows."""
    for block in getattr(model, "blocks", []):
        for parent_name, (fused_name, names) in FUSED_PROJECTIONS.items():
            parent = getattr(block, parent_name)
            parts = [parent._modules.get(n) for n in names]
            kind = type(parts[0])
            if kind not in (Int8Linear, Int4Linear) or any(type(p) is not kind for p in parts):
                continue  # absent (GELU MLP) or not all of one quantized kind
            tensors = [_portable_dict(p) for p in parts]
            cat = {k: torch.cat([t[k] for t in tensors]) for k in tensors[0]}
            biases = [p.bias for p in parts]
            bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
            if kind is Int4Linear:
                fused = Int4Linear(cat["qweight"], cat["scales"], cat["mins"], parts[0].group_size, bias,
                                   parts[0].compute_dtype)
            else:
                fused = Int8Linear(cat["qweight"], cat["scales"], bias, parts[0].compute_dtype)
            for n in names:
                delattr(parent, n)
            setattr(parent, fused_name, fused)
        return_freed_memory()
    return model


def _unfused_modules(model: nn.Module):
    """``(name, module, row range)`` for every quantized layer under its canonical name: a fused layer
    appears once per part, with the rows that part owns."""
    cfg = getattr(model, "config", None)
    for name, m in model.named_modules():
        if not isinstance(m, QUANT_MODULES):
            continue
        prefix, _, leaf = name.rpartition(".")
        parts = {fused: names for fused, names in FUSED_PROJECTIONS.values()}.get(leaf)
        if parts is None:
            yield name, m, None
            continue
        kv = cfg.n_kv_heads * cfg.head_dim
        sizes = (cfg.n_heads * cfg.head_dim, kv, kv) if leaf == "qkv_proj" else (cfg.d_ff, cfg.d_ff)
        start = 0
        for part, size in zip(parts, sizes):
            yield f"{prefix}.{part}", m, (start, start + size)
            start += size


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All tensors of a quantized model in the portable format, under canonical names."""
    info = quantization_of(model)
    if info is None:
        raise ConfigError("the model is not quantized: call quantize_model first")
    tied = model.config.tie_embeddings
    out: dict[str, torch.Tensor] = {}
    handled: set[str] = set()
    portable: dict[int, dict[str, torch.Tensor]] = {}  # a fused layer is unpacked once for all its parts
    for name, m, rows in _unfused_modules(model):
        handled.add(name)
        if tied and name == "lm_head" and info.get("embeddings", True):
            continue  # rebuilt from the embedding on load
        tensors = portable.setdefault(id(m), _portable_dict(m))  # int8: qweight and scales only
        if getattr(m, "bias", None) is not None:
            tensors = {**tensors, "bias": m.bias.detach()}
        if rows is not None:
            tensors = {k: v[rows[0] : rows[1]].contiguous() for k, v in tensors.items()}
        out.update({f"{name}.{k}": v for k, v in tensors.items()})
    handled.update(name for name, m in model.named_modules() if isinstance(m, QUANT_MODULES))
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] not in handled and not (tied and key == "lm_head.weight"):
            out[key] = value
    return out


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in memory aligned to 64 bytes. Tensors read by safetensors can start anywhere in the file's
    buffer, and PyTorch's int8 CPU kernel crashes (segmentation fault, measured) on a misaligned weight."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def build_quantized_model(config: ModelConfig, tensors: MutableMapping[str, torch.Tensor], info: dict,
                          dtype: torch.dtype = torch.float32, source: str = "weights") -> nn.Module:
    """A quantized Transformer from portable tensors (the inverse of ``quantized_state_dict``).

    ``tensors`` may be a dict or a lazy mapping that reads each tensor when it is popped (see
    ``quant.checkpoint``): layers are built one at a time and each layer's tensors are taken out of ``tensors``
    (a dict is left empty), so only one layer's portable copy is in memory beside the packed model.
    """
    from scratchlm.model import skeleton

    mode, group_size = info.get("mode"), info.get("group_size")
    if mode not in MODES or (mode == "int4" and group_size not in (*GROUP_SIZES, CHANNEL)):
        raise ModelFileError(f"{source}: unknown quantization {info!r}")

    def take(prefix: str, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        missing = [f"{prefix}.{n}" for n in names if f"{prefix}.{n}" not in tensors]
        if missing:
            raise ModelFileError(f"{source}: missing quantized tensors {missing[:3]}: the file is incomplete")
        # int4 codes are repacked for the kernel anyway; everything else is used in place, so align it.
        return {n: tensors.pop(f"{prefix}.{n}") if n == "qweight" and len(names) == 3
                else _aligned(tensors.pop(f"{prefix}.{n}")) for n in names}

    int8_names, int4_names = ("qweight", "scales"), ("qweight", "scales", "mins")
    model = skeleton(config)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    emb = None
    if info.get("embeddings", True):
        emb = QuantEmbedding(8, take("tok_embeddings", int8_names), None, dtype)
        model.tok_embeddings = emb

    def is_int8(name: str) -> bool:
        # The head is int8 in both modes (see quantize_model); so are layers a GGUF file stored in 5-8 bits.
        return mode == "int8" or name == "lm_head" or name in info.get("int8_layers", ())

    # Projections that fuse_projections would join (q/k/v, gate/up) are joined here, from the portable tensors,
    # so that each fused layer is packed for the kernel once: packing the parts and then unpacking them to
    # join them cost 4.6 of SmolLM2's 20 s load (profiled on a loaded machine).
    groups: dict[str, list[str]] = {}
    present = set(linears)
    for block_name, block in model.named_children():
        if block_name != "blocks":
            continue
        for index in range(len(block)):
            for parent, (_, names) in FUSED_PROJECTIONS.items():
                full = [f"blocks.{index}.{parent}.{n}" for n in names]
                if all(n in present for n in full) and len({is_int8(n) for n in full}) == 1:
                    groups[full[0]] = full
    skip = {n for full in groups.values() for n in full[1:]}
    for i, name in enumerate(linears):
        if name in skip:
            continue
        if i % 8 == 7:
            return_freed_memory()  # see there: without it, the freed file copies pile up
        int8 = is_int8(name)
        names = groups.get(name, [name])
        if name == "lm_head" and config.tie_embeddings and emb is not None:
            parts = emb.portable()
        else:
            pieces = [take(n, int8_names if int8 else int4_names) for n in names]
            parts = pieces[0] if len(pieces) == 1 else {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
        biases = [tensors.pop(f"{n}.bias", None) for n in names]
        if any(b is not None for b in biases) and any(b is None for b in biases):
            raise ModelFileError(f"{source}: some of {', '.join(names)} have biases and some do not")
        bias = None if biases[0] is None else _aligned(torch.cat(biases) if len(biases) > 1 else biases[0])
        if int8:
            new = Int8Linear(parts["qweight"], parts["scales"], bias, dtype)
        else:
            new = Int4Linear(parts["qweight"], parts["scales"], parts["mins"], group_size, bias, dtype)
        if len(names) == 1:
            model.set_submodule(name, new)
            continue
        parent_name = name.rsplit(".", 1)[0]
        parent = model.get_submodule(parent_name)
        fused_name = FUSED_PROJECTIONS[parent_name.rsplit(".", 1)[1]][0]
        for n in names:
            delattr(parent, n.rsplit(".", 1)[1])
        setattr(parent, fused_name, new)
    floats = {k: _aligned(v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    tensors.clear()
    expected = set(model.state_dict())
    try:
        model.load_state_dict(floats, strict=False, assign=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{source}: tensors do not fit the architecture: {str(exc).splitlines()[0]}") from None
    left = [k for k, v in list(model.named_parameters()) + list(model.named_buffers()) if v.is_meta]
    if left or set(floats) - expected:
        raise ModelFileError(f"{source}: tensors do not match the architecture (missing {left[:3]}, "
                             f"unexpected {sorted(set(floats) - expected)[:3]})")
    model.quantization = {"mode": mode, "group_size": group_size, "embeddings": info.get("embeddings", True),
                          **{k: info[k] for k in ("int8_layers", "source", "bits", "method") if k in info}}
    return fuse_projections(model).eval()


def quantized_from_gguf(config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                        source: str = "gguf") -> nn.Module:
    """The quantized Transformer for the tensors of a block-quantized GGUF file (``formats.gguf.load_gguf``
    with ``keep_int4=True``), keeping each layer as close to the file as our layers allow:

    - Q4_0, Q4_1, Q4_K linear layers arrive as int4 codes at group size 32 and stay exactly those weights;
    - other linear layers (Q8_0, Q5_0/1, Q6_K, Q2_K/Q3_K, float) become int8 per output channel: not exact
      for Q8_0/Q5/Q6_K (their 32-weight blocks each have a scale, ours one per row), better than the file
      for Q2_K/Q3_K; listed in ``quantization["int8_layers"]``;
    - the token embedding and the LM head are int8 per row, as ``quantize_model`` makes them.

    ``state`` is consumed (left empty): each layer's file tensors are freed once the layer is packed, so the
    portable copy of the whole model and the packed one never coexist (SmolLM2: 103 + 91 MB).
    """
    from scratchlm.quant.int8 import quantize_int8

    tensors: dict[str, torch.Tensor] = {}
    # int8 rows that the reader made from block-quantized tensors (``formats.gguf._int8_rows``)
    int8_layers = [k.removesuffix(".qweight") for k, v in state.items()
                   if k.startswith("blocks.") and k.endswith(".qweight") and v.dtype == torch.int8]
    for key in list(state):
        prefix, _, leaf = key.rpartition(".")
        if leaf != "weight" or state[key].ndim != 2 or "norm" in prefix:
            continue
        if prefix.startswith("blocks."):
            int8_layers.append(prefix)
        elif prefix == "lm_head" and config.tie_embeddings:
            continue
        elif prefix not in ("tok_embeddings", "lm_head"):
            continue  # learned positions stay float
        # Rows are independent: quantizing 4,096 at a time gives the same result with small temporaries
        # (SmolLM2's embedding is 113 MB in float32; whole, its quantization peaked 3x that).
        parts = [quantize_int8(rows) for rows in state.pop(key).split(4096)]
        tensors[f"{prefix}.qweight"] = torch.cat([q for q, _ in parts])
        tensors[f"{prefix}.scales"] = torch.cat([s for _, s in parts])
        del parts
        return_freed_memory()
    while state:  # moved, not copied: build_quantized_model frees each layer's tensors as it goes
        key, value = state.popitem()
        tensors[key] = value
    mode = "int4" if any(k.endswith(".mins") for k in tensors) else "int8"
    info = {"mode": mode, "group_size": 32 if mode == "int4" else None, "embeddings": True,
            "int8_layers": int8_layers if mode == "int4" else [], "source": "gguf"}
    model = build_quantized_model(config, tensors, info, dtype, source)
    return_freed_memory()
    return model
