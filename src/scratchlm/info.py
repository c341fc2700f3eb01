"""``scratchlm info``: what a model file holds, read from its metadata without loading the weights."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from scratchlm.config import ModelConfig
from scratchlm.errors import ModelFileError
from scratchlm.files import read_json
from scratchlm.model import expected_shapes


def _architecture(config: ModelConfig) -> str:
    if config.positions == "learned":
        return "gpt2-style (learned positions, LayerNorm, GELU)"
    gqa = ""
    if config.n_kv_heads != config.n_heads:
        gqa = f", grouped-query attention {config.n_heads}/{config.n_kv_heads}"
    return f"llama-style (RoPE theta {config.rope_theta:g}, RMSNorm, SwiGLU{gqa})"


def _dir_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def model_info(name_or_path: str) -> dict[str, str]:
    """Architecture, parameter count, context length, stored dtypes and file size of a model."""
    from scratchlm.formats import checkpoint, hf, torch_files
    from scratchlm.hub import resolve

    path = resolve(name_or_path)
    if path.is_file() and path.name.startswith("pytorch_model") and (path.parent / "config.json").is_file():
        path = path.parent  # HF weights: describe their directory
    if path.is_file() and path.suffix == ".gguf":
        from scratchlm.formats.gguf import config_from_gguf, read_gguf

        reader, meta = read_gguf(path)
        config = config_from_gguf(meta, name=path.stem)
        dtypes = Counter(t.tensor_type.name for t in reader.tensors)
        fmt = f"GGUF v{meta.get('GGUF.version')} ({meta.get('general.name', '?')})"
        runs_as = _gguf_runs_as(reader)
    elif path.is_file() or not (path / "config.json").is_file() and not checkpoint.is_model_dir(path) and \
            (torch_files.is_litgpt_dir(path) or (path / torch_files.NANOGPT_FILE).is_file()):
        config, dtypes, fmt = _torch_checkpoint(path)
    else:
        if checkpoint.is_model_dir(path):
            config = ModelConfig.from_dict(read_json(path / checkpoint.CONFIG_FILE))
            fmt = "scratchlm model directory"
        else:
            config = hf.config_from_hf(read_json(path / "config.json"), name=path.name)
            fmt = "HF transformers directory"
        dtypes = Counter()
        for f in path.glob("*.safetensors"):
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            dtypes.update(v["dtype"] for k, v in header.items() if k != "__metadata__")
        if not dtypes and torch_files.has_hf_weights(path):
            fmt = "HF transformers directory (pytorch_model.bin, read weights-only)"
            for f in sorted(path.glob("pytorch_model*.bin")):
                dtypes.update(torch_files.stored_dtypes(f))
    if not (path.is_file() and path.suffix == ".gguf"):
        from scratchlm.quant.checkpoint import QUANT_FILE

        if path.is_dir() and (path / QUANT_FILE).is_file():
            q = read_json(path / QUANT_FILE)
            group = f" group {q.get('group_size')}" if q.get("group_size") else ""
            runs_as = f"{q.get('mode')}{group} as stored, {_engine(q.get('mode') == 'int4')}"
        else:
            runs_as = ("float32, eager (--dtype bfloat16; --quantize int4 for the fast engine: int4 and the "
                       "compiled decode step)")
    stored = ", ".join(f"{k} x{v}" for k, v in dtypes.most_common())
    n_params = sum(_prod(s) for s in expected_shapes(config).values())
    return {
        "model": str(name_or_path), "path": str(path), "format": fmt, "architecture": _architecture(config),
        "parameters": f"{n_params / 1e6:.1f}M", "layers": str(config.n_layers), "d_model": str(config.d_model),
        "heads": f"{config.n_heads} (key/value {config.n_kv_heads})", "context length": str(config.context_length),
        "vocabulary": str(config.vocab_size), "tied embeddings": str(config.tie_embeddings),
        "stored dtypes": stored, "file size": f"{_dir_size(path) / 2**20:.1f} MiB", "runs as": runs_as,
    }


def _gguf_runs_as(reader) -> str:
    """How ``LLM.load`` runs a GGUF file by default (see ``quant.quantize.quantized_from_gguf``)."""
    from scratchlm.formats.ggml_quants import INT4_BLOCK_TYPES
    from scratchlm.formats.gguf import is_quantized_gguf

    if not is_quantized_gguf(reader):
        return "float32, eager (--dtype bfloat16 to halve it; --quantize int4 for the fast engine)"
    linear = Counter(t.tensor_type.name for t in reader.tensors
                     if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2)
    int4 = sum(n for kind, n in linear.items() if kind in INT4_BLOCK_TYPES)
    parts = []
    if int4:
        kinds = "/".join(k for k in linear if k in INT4_BLOCK_TYPES)
        parts.append(f"{int4} layers int4 group 32 (the file's own {kinds} codes, exact)")
    if sum(linear.values()) > int4:
        others = "/".join(k for k in linear if k not in INT4_BLOCK_TYPES)
        parts.append(f"{sum(linear.values()) - int4} layers int8 per row (from {others})")
    return (", ".join(parts) + f"; embedding and head int8; {_engine(bool(int4))}. "
            "--dtype float32|bfloat16: dequantized")


def _engine(compiled: bool) -> str:
    """The decode engine ``LLM.load`` picks (``compiled.use_compiled_by_default``: int4 models are compiled)."""
    if compiled:
        return ("the compiled decode step (built in the background on the first run on this machine, eager until "
                "then; --no-compile: eager)")
    return "eager (--compile: the compiled decode step)"


def _torch_checkpoint(path: Path) -> tuple[ModelConfig, Counter, str]:
    """Config, stored dtypes and a format line of a nanoGPT or litgpt checkpoint (memory-mapped, not read)."""
    from scratchlm.formats import torch_files

    if path.is_dir():
        path = path / (torch_files.LITGPT_WEIGHTS if torch_files.is_litgpt_dir(path) else torch_files.NANOGPT_FILE)
    dtypes = Counter(torch_files.stored_dtypes(path))
    if torch_files.is_litgpt_dir(path.parent):
        config = torch_files.litgpt_config(torch_files.read_litgpt_config(path.parent), name=path.parent.name)
        return config, dtypes, f"litgpt checkpoint ({path.name} + {torch_files.LITGPT_CONFIG}, read weights-only)"
    obj = torch_files.load_safely(path)
    if not torch_files.is_nanogpt(obj):
        raise ModelFileError(f"{path} is neither a nanoGPT ckpt.pt nor a litgpt lit_model.pth")
    config = torch_files.nanogpt_config(obj["model_args"], name=path.parent.name)
    details = [f"iteration {obj['iter_num']}"] if "iter_num" in obj else []
    if obj.get("best_val_loss") is not None:
        details.append(f"best validation loss {float(obj['best_val_loss']):.4f}")
    return config, dtypes, f"nanoGPT checkpoint ({', '.join(details + ['read weights-only'])})"


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
