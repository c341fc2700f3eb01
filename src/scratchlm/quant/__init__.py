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

from scratchlm.quant.checkpoint import is_quantized_dir, load_quantized_dir, save_quantized
from scratchlm.quant.embedding import QuantEmbedding
from scratchlm.quant.int4 import GROUP_SIZES, Int4Linear, dequantize_int4, int4_linear, quantize_int4
from scratchlm.quant.int8 import Int8Linear, dequantize_int8, int8_linear, quantize_int8
from scratchlm.quant.quantize import MODES, build_quantized_model, quantization_of, quantize_model, quantized_state_dict

__all__ = [
    "GROUP_SIZES", "MODES", "Int4Linear", "Int8Linear", "QuantEmbedding", "build_quantized_model",
    "dequantize_int4", "dequantize_int8", "int4_linear", "int8_linear", "is_quantized_dir", "load_quantized_dir",
    "quantization_of", "quantize_int4", "quantize_int8", "quantize_model", "quantized_state_dict", "save_quantized",
]
