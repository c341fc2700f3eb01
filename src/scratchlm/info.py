"""``scratchlm info``: what a model file holds, read from its metadata without loading the weights."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from scratchlm.config import ModelConfig
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
    from scratchlm.formats import checkpoint, hf
    from scratchlm.hub import resolve

    path = resolve(name_or_path)
    if path.is_file():
        from scratchlm.formats.gguf import config_from_gguf, read_gguf

        reader, meta = read_gguf(path)
        config = config_from_gguf(meta, name=path.stem)
        dtypes = Counter(t.tensor_type.name for t in reader.tensors)
        stored = ", ".join(f"{k} x{v}" for k, v in dtypes.most_common())
        fmt = f"GGUF v{meta.get('GGUF.version')} ({meta.get('general.name', '?')})"
    else:
        import json

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
        stored = ", ".join(f"{k} x{v}" for k, v in dtypes.most_common())
    n_params = sum(_prod(s) for s in expected_shapes(config).values())
    return {
        "model": str(name_or_path), "path": str(path), "format": fmt, "architecture": _architecture(config),
        "parameters": f"{n_params / 1e6:.1f}M", "layers": str(config.n_layers), "d_model": str(config.d_model),
        "heads": f"{config.n_heads} (key/value {config.n_kv_heads})", "context length": str(config.context_length),
        "vocabulary": str(config.vocab_size), "tied embeddings": str(config.tie_embeddings),
        "stored dtypes": stored, "file size": f"{_dir_size(path) / 2**20:.1f} MiB",
    }


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
