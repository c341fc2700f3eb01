"""``scratchlm estimate CONFIG_OR_MODEL``: parameters, FLOPs, memory, compute-optimal data, time and cost.

    scratchlm estimate llama2-7b --tokens 2e12
    scratchlm estimate gpt3-175b --tokens 300e9 --devices 1024 --sharding zero3 --json
    scratchlm estimate smollm2-135m-instruct            # a model we load: only its config is read
    scratchlm estimate my_config.json                   # a ModelConfig dict, or an HF config.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scratchlm.config import PRESETS, ModelConfig
from scratchlm.errors import ConfigError, ModelFileError


def load_config(name_or_path: str) -> ModelConfig:
    """A preset name, a JSON config file (ours or HF's), or any model ``LLM.load`` takes (its config only, where
    the format allows reading it without the weights)."""
    from scratchlm.files import read_json

    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".json":
        data = read_json(path)
        if "model_type" in data or "architectures" in data:
            from scratchlm.formats.hf import config_from_hf

            return config_from_hf(data, name=path.parent.name)
        return ModelConfig.from_dict(data).replace(name=data.get("name", path.stem))
    from scratchlm.formats import checkpoint
    from scratchlm.hub import KNOWN_MODELS, resolve

    if not path.exists() and name_or_path not in KNOWN_MODELS:
        raise ConfigError(f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}), a JSON config file, "
                          "a known model nor a path")
    path = resolve(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        from scratchlm.formats.gguf import config_from_gguf, read_gguf

        return config_from_gguf(read_gguf(path)[1], name=path.stem)
    if path.is_dir() and checkpoint.is_model_dir(path):
        return ModelConfig.from_dict(read_json(path / checkpoint.CONFIG_FILE))
    if path.is_dir() and (path / "config.json").is_file():
        from scratchlm.formats.hf import config_from_hf

        return config_from_hf(read_json(path / "config.json"), name=path.name)
    try:
        from scratchlm.llm import LLM

        return LLM.load(path).config
    except ModelFileError as exc:
        raise ConfigError(f"cannot read a model config from {name_or_path}: {exc}") from None


def number(text: str) -> float:
    """1e9, 300e9, 2.5T, 70B, 1.4M: a count with an optional k/M/B/G/T suffix."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    try:
        if text and text[-1].lower() in scale:
            return float(text[:-1]) * scale[text[-1].lower()]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (examples: 300e9, 2T, 70B)") from None


def size(n: float) -> str:
    for unit, value in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= value:
            return f"{n / value:.2f}{unit}"
    return f"{n:.0f}"


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def print_report(r: dict) -> None:
    p = r["parameters"]
    print(f"{r['model']}: {p['total']:,} parameters ({size(p['total'])}; {size(p['non_embedding'])} outside the "
          "embeddings)")
    for key in ("token_embeddings", "position_embeddings", "type_embeddings", "attention", "mlp", "norms", "lm_head"):
        if p[key]:
            print(f"  {key.replace('_', ' '):<20} {p[key]:>18,}  {100 * p[key] / p['total']:5.1f}%")
    f = r["flops_per_token"]
    t = r["training_memory"]
    print(f"\nFLOPs per token: training {size(f['train_per_token'])} (6N + attention, attention "
          f"{100 * f['attention_share']:.1f}% at {t['seq_len']} tokens), forward {size(f['forward_per_token'])}; "
          f"generation {size(f['generate_per_token_first'])} (first position) to "
          f"{size(f['generate_per_token_at_context'])} (full context)")
    print(f"training tokens: {size(r['tokens'])} (Chinchilla-optimal: {size(r['chinchilla_tokens'])}, 20 per "
          f"parameter)\ntraining compute: {r['train_flops']:.3g} FLOPs (6ND alone: {r['train_flops_6n']:.3g})")
    h, run = r["hardware"], r["run"]
    print(f"on {h['devices']} device(s) of {h['flops'] / 1e12:g} TFLOP/s at {100 * h['utilisation']:.0f}% "
          f"utilisation: {run['days']:,.1f} days, {run['device_hours']:,.0f} device-hours, "
          f"${run['cost']:,.0f} at ${h['price_per_hour']:g}/hour")
    c = r["training_memory_checkpointed"]
    print(f"\ntraining memory per device ({t['precision']}, AdamW, sharding {t['sharding']} over {t['devices']}, "
          f"micro-batch {t['batch_size']} x {t['seq_len']}):")
    for key in ("weights", "gradients", "optimizer"):
        print(f"  {key:<28} {gib(t[key + '_bytes']):>14}")
    print(f"  {'activations':<28} {gib(t['activations_bytes']):>14}   (with activation checkpointing: "
          f"{gib(c['activations_bytes'])})")
    print(f"  {'all parts':<28} {gib(t['total_bytes']):>14}   (checkpointed: {gib(c['total_bytes'])})")
    print(f"  {'peak':<28} {gib(t['peak_bytes']):>14}   (checkpointed: {gib(c['peak_bytes'])}; activations or "
          "gradients, not both)")
    i = r["inference_memory"]
    print(f"\ninference memory ({i['dtype']} weights, batch {i['batch_size']}, context {i['context']}):")
    print(f"  {'weights':<28} {gib(i['weights_bytes']):>14}")
    print(f"  {'KV cache':<28} {gib(i['kv_cache_bytes']):>14}   ({i['kv_cache_per_token_bytes'] / 1024:,.1f} KiB "
          "per token)")
    print(f"  {'prefill activations':<28} {gib(i['prefill_activations_bytes']):>14}")
    print(f"  {'total':<28} {gib(i['total_bytes']):>14}")


def cmd_estimate(args: argparse.Namespace) -> None:
    from scratchlm.estimate import Hardware, estimate

    config = load_config(args.model)
    hardware = Hardware(flops=args.device_flops, utilisation=args.utilisation, price_per_hour=args.price,
                        devices=args.devices)
    report = estimate(config, tokens=args.tokens, batch_size=args.batch_size, seq_len=args.seq_len,
                      precision=args.precision, sharding=args.sharding, devices=args.devices,
                      inference_dtype=args.inference_dtype,
                      inference_batch=args.inference_batch, kv_bytes=4 if args.kv_dtype == "float32" else 2,
                      hardware=hardware)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_report(report)


def register(sub) -> None:
    from scratchlm.estimate import PRECISIONS, SHARDING, WEIGHT_BYTES

    p = sub.add_parser("estimate", help="parameters, FLOPs, memory, Chinchilla tokens, time and cost of a model",
                       description="Estimates from the model's config alone: CONFIG_OR_MODEL is a preset ("
                                   + ", ".join(PRESETS) + "), a JSON config file, or a model scratchlm loads.")
    p.add_argument("model", metavar="CONFIG_OR_MODEL", help="a preset, a config .json, or a model name or path")
    p.add_argument("--tokens", type=number, default=None,
                   help="training tokens, e.g. 300e9 or 2T (default: Chinchilla-optimal, 20 per parameter)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=1, help="micro-batch per device, in sequences (default 1)")
    g.add_argument("--seq-len", type=int, default=None, help="training sequence length (default: the context)")
    g.add_argument("--precision", choices=PRECISIONS, default="mixed",
                   help="mixed (bf16 with float32 master weights, default), float32, or bfloat16 throughout")
    g.add_argument("--sharding", choices=SHARDING, default="none",
                   help="ZeRO stage 1-3 or FSDP (= ZeRO-3) across --devices (default none)")
    g.add_argument("--devices", type=int, default=1, help="devices training together (default 1)")
    g = p.add_argument_group("inference")
    g.add_argument("--inference-dtype", choices=WEIGHT_BYTES, default="float32", help="weight type (default float32)")
    g.add_argument("--inference-batch", type=int, default=1, help="sequences generated together (default 1)")
    g.add_argument("--kv-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="KV cache numbers (default float32, as scratchlm keeps them on a CPU; GPUs: the model's)")
    g = p.add_argument_group("time and cost")
    g.add_argument("--device-flops", type=number, default=312e12,
                   help="peak FLOP/s of one device (default 312e12: an A100's bfloat16 dense peak)")
    g.add_argument("--utilisation", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    g.add_argument("--price", type=float, default=2.0, help="dollars per device-hour (default 2.0)")
    p.set_defaults(func=cmd_estimate)
