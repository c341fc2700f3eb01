"""Weight-only quantization: int8 per output channel, int4 group-wise (32, 64 or 128 weights per group).

    from scratchlm.quant import quantize_model, save_quantized
    quantize_model(llm.model, "int4", group_size=64)      # swaps nn.Linear / nn.Embedding in place
    save_quantized("smollm2-int4", llm.model, llm.tokenizer, llm.template.source)
    LLM.load("smollm2-int4")                              # reads it back
    LLM.load("smollm2-135m-instruct", quantize="int8")    # or quantize at load

Function-level API, for code that wants quantized weights without the module swap (QLoRA's frozen base):

    qweight, scales, mins = quantize_int4(w, 64)          # w [N, K] -> uint8 [N, K/2], float32 [N, K/64] x 2
    w_hat = dequantize_int4(qweight, scales, mins, 64)    # back to float [N, K]
    layer = Int4Linear(qweight, scales, mins, 64)         # y = x @ w_hat.T, through PyTorch's int4 CPU kernel
    qweight, scales = quantize_int8(w); dequantize_int8(qweight, scales); Int8Linear(qweight, scales)
"""

from scratchlm.lazy import lazy_exports

# Loaded on first use (PEP 562), so that `scratchlm --help`, which imports quant/cli.py, does not import torch.
_EXPORTS = {
    "is_quantized_dir": "checkpoint", "load_quantized_dir": "checkpoint", "save_quantized": "checkpoint",
    "QuantEmbedding": "embedding",
    "GROUP_SIZES": "int4", "Int4Linear": "int4", "dequantize_int4": "int4", "int4_linear": "int4",
    "quantize_int4": "int4",
    "Int8Linear": "int8", "dequantize_int8": "int8", "int8_linear": "int8", "quantize_int8": "int8",
    "MODES": "quantize", "build_quantized_model": "quantize", "quantization_of": "quantize",
    "quantize_model": "quantize", "quantized_state_dict": "quantize",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
