"""Export the forward pass to ONNX for a fixed batch size and sequence length.

The graph maps ``input_ids`` (int64 [batch, seq_len]) to ``logits`` (float32 [batch, seq_len, vocab]):
one causal forward pass with no KV cache, which is what ONNX Runtime, TensorRT or a browser runtime
need to score or classify text. Generation loops with a cache are not exported.

We use PyTorch's ``torch.export``-based exporter (``dynamo=True``, the default since PyTorch 2.9; it needs
the ``onnxscript`` package): the older TorchScript exporter cannot translate grouped-query attention
(``scaled_dot_product_attention(..., enable_gqa=True)``). ``tests/test_export_onnx.py`` runs the file in
ONNX Runtime and compares its logits with ours.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from pathlib import Path

import torch

from scratchlm.errors import ConfigError, UnsupportedError
from scratchlm.files import atomic_file
from scratchlm.formats.export_common import check_dense

# ONNX files hold their weights in one protobuf message, which cannot exceed 2 GiB.
MAX_ONNX_BYTES = 2**31 - 2**24


def export_onnx(llm, out: str | Path, batch_size: int = 1, seq_len: int | None = None,
                force: bool = False) -> Path:
    """Write ``llm``'s forward pass as an ONNX file for inputs of shape [batch_size, seq_len].

    ``seq_len`` defaults to the context length (at most 256). Weights are stored in float32.
    """
    try:
        import onnxscript  # noqa: F401  (the exporter imports it; fail early with a clear message)
    except ImportError:
        raise UnsupportedError("ONNX export needs the packages onnx and onnxscript: "
                               "pip install onnx onnxscript (onnxruntime to run the result)") from None
    check_dense(llm)
    config = llm.config
    seq_len = seq_len if seq_len is not None else min(config.context_length, 256)
    if batch_size < 1 or not 1 <= seq_len <= config.context_length:
        raise ConfigError(f"ONNX input shape must be batch >= 1 and 1 <= seq_len <= {config.context_length} "
                          f"(the context length), got batch {batch_size}, seq_len {seq_len}")
    n_bytes = 4 * llm.model.num_parameters()
    if n_bytes > MAX_ONNX_BYTES:
        raise UnsupportedError(f"the float32 weights take {n_bytes / 2**30:.1f} GiB; a single ONNX file holds at "
                               "most 2 GiB (external data files are not written by scratchlm)")
    model = llm.model
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()  # Module.float() works in place: leave the caller's model alone
    model.eval()
    # The exporter logs a warning for each optional torchvision operator it cannot find.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    example = torch.zeros(batch_size, seq_len, dtype=torch.long)
    out = Path(out)
    with atomic_file(out, force) as tmp:
        # The exporter prints progress and version notices; keep the CLI's output to the result line.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, input_names=["input_ids"],
                                        output_names=["logits"], verbose=False)
            program.save(str(tmp))
    return out
