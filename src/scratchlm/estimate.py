"""What a model costs: parameters, FLOPs, memory, compute-optimal data, time and money, from its config alone.

    from scratchlm.estimate import estimate
    report = estimate(preset("llama2-7b"), tokens=2e12)
    report["parameters"]["total"], report["train_flops"], report["training_memory"]["total_bytes"]

Formulas and where they come from:

- Parameters, by component, counted from the config exactly as ``model.Transformer`` builds them.
- FLOPs per token (Kaplan et al. 2020, table 1; Chowdhery et al. 2022, appendix B): a matrix product with N
  weights costs 2N FLOPs per token forward and 4N backward, so training costs 6N per token, N being the weights
  that multiply (every linear layer and the LM head, also when it is tied; not the embedding lookup, norms or
  biases). Attention adds 2 x 2 x n_layers x (n_heads x head_dim) x T forward per token for the scores Q K^T and
  their product with V over a context of T: 12 x n_layers x n_heads x head_dim x T for training (PaLM's
  6N + 12LHQT). Generating one token at context t costs 2N + 4 x n_layers x n_heads x head_dim x t.
- Training memory (Rajbhandari et al. 2020, "ZeRO", section 3): mixed precision keeps 2 bytes of weights, 2 of
  gradients and 12 of AdamW state (float32 master weights, first and second moments) per parameter, 16 in all;
  float32 training keeps 4 + 4 + 8, also 16. ZeRO stage 1 splits the optimizer state across N devices, stage 2
  the gradients too, stage 3 (= FSDP's full sharding) the weights as well.
- Activations: what autograd keeps for the backward pass of our blocks (``model.py``, SDPA's memory-efficient
  attention, so no T x T matrix), per token and layer: the block input, the two norm outputs, Q, K, V, the
  attention output and its reshaped copy, the input of the MLP norm, and the MLP's hidden tensors (four of
  width d_ff for SwiGLU: gate, silu(gate), up and their product; two for GELU). The head keeps the final norm's
  input and output, and at the start of the backward pass three V-wide tensors per token (the log-softmax, its
  gradient and the logits' gradient). With activation checkpointing only each block's input is kept, and one
  block's activations are rebuilt at a time (Chen et al. 2016). Dropout masks are not counted. The total adds
  every part, an upper bound; the peak counts the larger of the activations and the gradients, since the
  backward pass creates the gradients while it frees the activations.
- Inference memory: weights at their width (int8: 1 byte and a float32 scale per output row; int4: half a byte
  and two bfloat16 numbers per group), the KV cache (2 x n_layers x n_kv_heads x head_dim numbers per token;
  float32 on a CPU, as ``model.KVCache`` keeps it) for the whole context and batch, and the prompt's
  activations in the prefill.
- Chinchilla (Hoffmann et al. 2022): about 20 training tokens per parameter is compute-optimal (their table 3:
  tokens grow in proportion to parameters; 70B parameters on 1.4T tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scratchlm.config import ModelConfig
from scratchlm.errors import ConfigError

CHINCHILLA_TOKENS_PER_PARAMETER = 20
PRECISIONS = {  # bytes per parameter: weights, gradients, optimizer state (AdamW)
    "float32": (4, 4, 8),
    "mixed": (2, 2, 12),  # bf16/fp16 weights and gradients, float32 master weights and moments (ZeRO, sec. 3)
    "bfloat16": (2, 2, 4),  # everything in bfloat16, moments included
}
SHARDING = ("none", "zero1", "zero2", "zero3", "fsdp")
WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class Hardware:
    """A device to price a run on: peak dense FLOP/s, the fraction of it a run achieves (model FLOPs
    utilisation), and the price of one device for one hour. The defaults are an NVIDIA A100's bfloat16 peak
    (312 TFLOP/s), 40% utilisation and 2 dollars an hour."""

    flops: float = 312e12
    utilisation: float = 0.4
    price_per_hour: float = 2.0
    devices: int = 1


def parameters(config: ModelConfig) -> dict[str, int]:
    """Parameters by component, as ``Transformer(config)`` builds them (a tied head counts once)."""
    C, L, F, V = config.d_model, config.n_layers, config.d_ff, config.vocab_size
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    norm = C * (2 if config.norm == "layernorm" else 1)
    attention = C * q + 2 * C * kv + q * C + (q + 2 * kv + C if config.bias else 0)
    width = 2 if config.mlp == "swiglu" else 1  # gate and up, or up alone
    mlp = (width + 1) * C * F + (width * F + C if config.bias else 0)
    counts = {
        "token_embeddings": V * C,
        "position_embeddings": config.context_length * C if config.positions == "learned" else 0,
        "type_embeddings": config.type_vocab_size * C,
        "attention": L * attention,
        "mlp": L * mlp,
        "norms": L * 2 * norm + norm,  # two per block, then the final norm (or, post-norm, the embeddings' norm)
        "lm_head": 0 if config.tie_embeddings else V * C,
    }
    counts["total"] = sum(counts.values())
    counts["non_embedding"] = counts["attention"] + counts["mlp"] + counts["norms"]
    return counts


def matmul_weights(config: ModelConfig) -> int:
    """The weights that multiply activations: every linear layer of the blocks, and the LM head (tied or not)."""
    C, F = config.d_model, config.d_ff
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    per_layer = 2 * C * q + 2 * C * kv + (3 if config.mlp == "swiglu" else 2) * C * F
    return config.n_layers * per_layer + config.vocab_size * C


def flops(config: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """FLOPs per token: forward, training (forward and backward) on sequences of ``seq_len`` (default the
    context length), and generation at the first and at the last position of the context."""
    T = seq_len or config.context_length
    n = matmul_weights(config)
    attn = 4 * config.n_layers * config.n_heads * config.head_dim  # per token, per unit of context
    return {
        "matmul_weights": n,
        "forward_per_token": 2 * n + attn * T,
        "train_per_token": 6 * n + 3 * attn * T,
        "attention_share": 3 * attn * T / (6 * n + 3 * attn * T),
        "generate_per_token_first": 2 * n + attn,
        "generate_per_token_at_context": 2 * n + attn * config.context_length,
    }


def activation_elements(config: ModelConfig, checkpointing: bool = False) -> float:
    """Numbers held per token at the peak of the backward pass (see the module docstring): every block's saved
    tensors and the head's, or, with checkpointing, the blocks' inputs and the larger of the head's tensors and
    one rebuilt block (with the gradient flowing through it)."""
    C, F, V = config.d_model, config.d_ff, config.vocab_size
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    block = 4 * C + 3 * q + 2 * kv + (4 if config.mlp == "swiglu" else 2) * F
    head = 2 * C + 3 * V
    if checkpointing:
        return config.n_layers * C + max(head, block + C)
    return config.n_layers * block + head


def training_memory(config: ModelConfig, batch_size: int, seq_len: int | None = None, precision: str = "float32",
                    sharding: str = "none", devices: int = 1, checkpointing: bool = False) -> dict[str, float]:
    """Bytes per device for training with AdamW: weights, gradients, optimizer state (split by ``sharding``
    across ``devices``), activations of a micro-batch of ``batch_size`` sequences of ``seq_len`` tokens."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if sharding not in SHARDING:
        raise ConfigError(f"unknown sharding {sharding!r}; choose one of {', '.join(SHARDING)}")
    if devices < 1 or batch_size < 1:
        raise ConfigError("devices and batch size must be at least 1")
    T = seq_len or config.context_length
    P = parameters(config)["total"]
    w, g, o = PRECISIONS[precision]
    stage = {"none": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}[sharding]
    weights = P * w / (devices if stage >= 3 else 1)
    grads = P * g / (devices if stage >= 2 else 1)
    optimizer = P * o / (devices if stage >= 1 else 1)
    act_bytes = 2 if precision in ("mixed", "bfloat16") else 4
    activations = batch_size * T * activation_elements(config, checkpointing) * act_bytes
    # The backward pass frees each block's activations as it makes that block's gradients (zero_grad sets them
    # to None), so at the peak the activations or the gradients are held, rarely all of both.
    return {"weights_bytes": weights, "gradients_bytes": grads, "optimizer_bytes": optimizer,
            "activations_bytes": activations, "total_bytes": weights + grads + optimizer + activations,
            "peak_bytes": weights + optimizer + max(grads, activations),
            "precision": precision, "sharding": sharding, "devices": devices, "batch_size": batch_size,
            "seq_len": T, "checkpointing": checkpointing}


def weight_bytes(config: ModelConfig, dtype: str = "float32", group_size: int = 32) -> float:
    """Bytes of the weights at ``dtype``: float32, bfloat16, float16; or int8 / int4 as ``quant.quantize_model``
    stores them: the blocks' linear layers at 1 byte (and a float32 scale per output row) or half a byte (and a
    bfloat16 scale and minimum per group), the token embedding and LM head int8, norms and positions float32."""
    if dtype not in WEIGHT_BYTES:
        raise ConfigError(f"unknown weight type {dtype!r}; choose one of {', '.join(WEIGHT_BYTES)}")
    counts = parameters(config)
    if dtype not in ("int8", "int4"):
        return counts["total"] * WEIGHT_BYTES[dtype]
    C, V = config.d_model, config.vocab_size
    linear = matmul_weights(config) - V * C
    # output rows of q, k, v, o, (gate,) up, down
    rows = config.n_layers * (config.n_heads * config.head_dim + 2 * config.n_kv_heads * config.head_dim + 2 * C
                              + (2 if config.mlp == "swiglu" else 1) * config.d_ff)
    blocks = linear + rows * 4 if dtype == "int8" else linear / 2 + linear / group_size * 4
    tables = (1 if config.tie_embeddings else 2) * (V * C + V * 4)  # int8 rows and their float32 scales
    rest = counts["total"] - linear - counts["token_embeddings"] - counts["lm_head"]
    return blocks + tables + rest * 4


def inference_memory(config: ModelConfig, batch_size: int = 1, context: int | None = None, dtype: str = "float32",
                     kv_bytes: int = 4, prompt_tokens: int | None = None, group_size: int = 32) -> dict[str, float]:
    """Bytes for generation: weights, the KV cache of ``batch_size`` sequences of ``context`` tokens (float32 on
    a CPU: ``kv_bytes=4``), and the prefill's activations over ``prompt_tokens`` per sequence (default all)."""
    T = context or config.context_length
    per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * kv_bytes
    prompt = T if prompt_tokens is None else prompt_tokens
    act = 4 if dtype in ("float32", "int8", "int4") else 2
    # Prefill, inside one block: the residual, its norm, Q, K, V, the attention output, then the MLP's
    # hidden tensors; plus the last position's logits.
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    widest = 2 * config.d_model + max(2 * q + 2 * kv, (4 if config.mlp == "swiglu" else 2) * config.d_ff)
    prefill = batch_size * (prompt * widest * act + config.vocab_size * 4)
    weights = weight_bytes(config, dtype, group_size)
    cache = batch_size * T * per_token
    return {"weights_bytes": weights, "kv_cache_per_token_bytes": per_token, "kv_cache_bytes": cache,
            "prefill_activations_bytes": prefill, "total_bytes": weights + cache + prefill, "dtype": dtype,
            "batch_size": batch_size, "context": T}


def chinchilla_tokens(config: ModelConfig) -> float:
    """Compute-optimal training tokens for this size (Hoffmann et al. 2022): about 20 per parameter."""
    return CHINCHILLA_TOKENS_PER_PARAMETER * parameters(config)["total"]


def run_cost(train_flops: float, hardware: Hardware) -> dict[str, float]:
    """Wall-clock time and price of ``train_flops`` on ``hardware``."""
    if hardware.flops <= 0 or not 0 < hardware.utilisation <= 1 or hardware.devices < 1:
        raise ConfigError("device FLOP/s must be positive, utilisation in (0, 1], devices at least 1")
    seconds = train_flops / (hardware.flops * hardware.utilisation * hardware.devices)
    return {"seconds": seconds, "days": seconds / 86400, "device_hours": seconds / 3600 * hardware.devices,
            "cost": seconds / 3600 * hardware.devices * hardware.price_per_hour}


def estimate(config: ModelConfig, tokens: float | None = None, batch_size: int = 1, seq_len: int | None = None,
             precision: str = "mixed", sharding: str = "none", devices: int = 1,
             inference_dtype: str = "float32", inference_batch: int = 1, kv_bytes: int = 4,
             hardware: Hardware | None = None) -> dict:
    """Everything above in one JSON-ready dict. ``tokens``: training tokens (default Chinchilla-optimal). Training
    memory comes twice: ``training_memory`` without activation checkpointing, ``training_memory_checkpointed``
    with it."""
    hardware = hardware or Hardware(devices=devices)
    T = seq_len or config.context_length
    if T > config.context_length:
        raise ConfigError(f"sequence length {T} is longer than the context window ({config.context_length})")
    counts = parameters(config)
    optimal = chinchilla_tokens(config)
    tokens = optimal if tokens is None else float(tokens)
    if tokens <= 0 or not math.isfinite(tokens):
        raise ConfigError(f"--tokens must be a positive number, got {tokens}")
    per_token = flops(config, T)
    train_flops = per_token["train_per_token"] * tokens
    memory = {
        "training_memory": training_memory(config, batch_size, T, precision, sharding, devices, False),
        "training_memory_checkpointed": training_memory(config, batch_size, T, precision, sharding, devices, True),
        "inference_memory": inference_memory(config, inference_batch, config.context_length, inference_dtype, kv_bytes),
    }
    return {
        "model": config.name, "parameters": counts, "flops_per_token": per_token, "tokens": tokens,
        "chinchilla_tokens": optimal, "train_flops": train_flops, "train_flops_6n": 6 * counts["total"] * tokens,
        **memory, "hardware": vars(hardware), "run": run_cost(train_flops, hardware),
    }
