"""GPTQ: quantize a layer's weights one column at a time, pushing each column's rounding error onto the
columns not yet quantized (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1).

Round to nearest (RTN) minimises each weight's own error. What matters is the layer's output on real inputs
X [K, n]: GPTQ minimises ``||W X - Q(W) X||^2`` row by row. That error is a quadratic form in the weight
error with the Hessian ``H = 2 X X^T`` (the same for every row), so after rounding column j the best update
of the columns after it is ``-err_j * H^-1[j, j+1:] / H^-1[j, j]`` (Optimal Brain Surgeon, Hassibi and Stork
1993). GPTQ's three tricks make that fast and stable:

- *one order for all rows* (section 3, step 1): columns are quantized left to right (or, with ``act_order``,
  by decreasing ``H[j, j]``, the input's energy), so one inverse Hessian serves every row;
- *Cholesky* (step 3): the rows of ``H^-1`` needed at each step are the rows of the upper Cholesky factor of
  ``H^-1``, computed once; ``damp`` (a fraction of the mean diagonal) is added to ``H`` first, so that it is
  positive definite and the updates stay small;
- *lazy batch updates* (step 2): updates are applied inside a block of ``block_size`` columns at once and
  pushed to the rest of the matrix once per block, a matrix product instead of many rank-one updates.

Groups: without ``act_order`` a group's grid (step and minimum, ``int4.fit_grid``) is fitted when its first
column is reached, on the weights as already updated; with ``act_order`` or per channel, every grid is fitted
on the original weights first ("static groups", as AutoGPTQ), so that groups stay contiguous columns, which
is what our int4 format stores. The grid is the one round-to-nearest uses, so with an identity Hessian and no
damping GPTQ returns exactly RTN's codes (tested).

    qweight, scales, mins = gptq_quantize(weight, hessian, group_size=128, bits=4)   # one layer
    gptq_quantize_model(llm.model, tokens, group_size=128)       # every block, layer by layer, then int4 layers
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from scratchlm.errors import ConfigError
from scratchlm.quant.int4 import (
    BITS,
    check_group_size,
    dequantize_int4,
    fit_grid,
    group_width,
    pack_codes,
    round_to_grid,
)

DEFAULT_DAMP = 0.01  # the paper's 1% of the mean diagonal
DEFAULT_BLOCK_SIZE = 128


@contextlib.contextmanager
def one_thread():
    """Run PyTorch on one thread inside. GPTQ's column loop is thousands of operations on one column
    ([N] elements each): a second thread cannot speed them up, and on a busy machine each one waits for it.
    Measured on a 1536 x 576 layer at load 15 on 2 cores: 0.7 s on one thread, 19.7 s on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int | str = 128, bits: int = 4,
                  act_order: bool = False, damp: float = DEFAULT_DAMP, block_size: int = DEFAULT_BLOCK_SIZE,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ for one weight matrix [N, K] given the Hessian [K, K] of its inputs (``X X^T``, any scale).

    Returns the portable int4 tensors ``(qweight, scales, mins)`` (``int4.py``), codes in 0..2**bits - 1.
    """
    with one_thread():
        return _gptq(weight, hessian, group_size, bits, act_order, damp, block_size)


def _gptq(weight, hessian, group_size, bits, act_order, damp, block_size):
    n, k = weight.shape
    check_group_size(group_size, k)
    if bits not in BITS:
        raise ConfigError(f"unsupported bit width {bits}; choose one of {', '.join(map(str, BITS))}")
    g = group_width(group_size, k)
    if g < k and block_size % g:
        block_size = g * max(1, block_size // g)  # a group never straddles two blocks
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0  # an input that is always zero: its weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0

    static = act_order or g == k
    if static:  # every group's grid from the original weights, in the original column order
        scales, mins, _ = fit_grid(W.reshape(n, k // g, g), bits)
    else:
        scales, mins = torch.empty(n, k // g), torch.empty(n, k // g)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_hessian_factor(H, damp)

    Q = torch.zeros_like(W)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])  # the column's place in the original order
            if not static and col % g == 0:  # the first column of a group: fit its grid now
                s, m, _ = fit_grid(W1[:, i : i + g][:, None, :], bits)
                scales[:, col // g], mins[:, col // g] = s[:, 0], m[:, 0]
            s, m = scales[:, col // g], mins[:, col // g]
            w = W1[:, i]
            q = round_to_grid(w, s, m, bits)
            Q[:, i1 + i] = q
            err = (w - (q * s + m)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # OBS update of the block's later columns
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the lazy batch update of every column after the block
    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    return pack_codes(codes), scales.contiguous(), mins.contiguous()


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (GPTQ, section 3, step 3).

    A Hessian that is not positive definite even so (too few calibration tokens for the layer's width) is
    damped ten times more, up to three times, before giving up with a ConfigError.
    """
    k = H.shape[0]
    mean_diag = torch.diag(H).mean()
    for attempt in range(4):
        factor = damp * 10**attempt if damp > 0 else (0.0 if attempt == 0 else 0.01 * 10 ** (attempt - 1))
        try:
            L = torch.linalg.cholesky(H + factor * mean_diag * torch.eye(k))
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ConfigError("GPTQ: the layer's input Hessian is not positive definite even with damping: give more "
                      "calibration text (--samples/--seq-len) or a larger --damp")


def layer_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||W X - Q X||^2 / n`` from the Hessian ``H = X X^T / n``: the trace of ``(W - Q) H (W - Q)^T``."""
    d = (weight - quantized).double()
    return float(((d @ hessian.double()) * d).sum())


class Hessian:
    """Running ``X X^T / n`` over batches of inputs [..., K]: one ``addmm_`` per batch into a float32 sum.

    float32 is enough: the GPTQ reference code accumulates in float32 too, and a sum of 65,536 products carries
    a relative error near ``sqrt(n) * 6e-8``, far below the 1% damping added before the Cholesky factor."""

    def __init__(self, k: int):
        self.sum = torch.zeros(k, k)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x.t(), x)
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, tokens: torch.Tensor, group_size: int | str = 128, bits: int = 4,
                        act_order: bool = False, damp: float = DEFAULT_DAMP, batch_size: int = 8,
                        sequential: bool = True, progress: bool = False) -> nn.Module:
    """Quantize ``model`` (float, in place) to int4 with GPTQ on the calibration ``tokens`` [samples, seq_len].

    Block by block (section 4, "layer-wise"): the calibration states enter block i through the blocks before
    it, already quantized. Within a block, with ``sequential`` (the reference code's ``--true-sequential``),
    the layers are quantized in the order their inputs arise (q/k/v, o, gate/up, down), each layer's Hessian
    taken with the layers before it already quantized (``calibration.SequentialPasses`` keeps the attention's and
    the MLP's inputs between the passes, so this costs no more than the other way). Without it (the reference
    code's default), one pass through the float block gives every layer's Hessian at once, then the quantized
    block's pass gives the next block's inputs.
    Then the model becomes the same int4 model as ``quantize_model`` makes (embedding and LM head int8, layers
    fused), with GPTQ's codes in its int4 layers. Returns the model.
    """
    from scratchlm.progress import bar
    from scratchlm.quant.calibration import SequentialPasses, block_inputs, block_linears, capture_inputs, run_block
    from scratchlm.quant.quantize import check_options, quantization_of, quantize_model

    if quantization_of(model) is not None:
        raise ConfigError("this model is already quantized: GPTQ needs the float model")
    group_size = check_options("int4", group_size, bits)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            check_group_size(group_size, m.in_features, name)
    states = block_inputs(model, tokens, batch_size)
    done: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def quantize_group(i: int, block: nn.Module, names: list[str], hessian: Hessian) -> None:
        H = hessian.value()
        for name in names:
            layer = block.get_submodule(name)
            tensors = gptq_quantize(layer.weight, H, group_size, bits, act_order, damp)
            done[f"blocks.{i}.{name}"] = tensors
            # the layers after this one see its quantized output (the float weights are not needed again)
            layer.weight.copy_(dequantize_int4(*tensors, group_size, layer.weight.dtype))

    blocks = list(enumerate(model.blocks))
    for i, block in bar(blocks, f"GPTQ int{bits} (group {group_size})", progress, unit="layer"):
        groups = block_linears(block)  # the layers of a group read the same input: one Hessian
        if sequential:
            passes = SequentialPasses(block, states)
            for names in groups:
                hessian = Hessian(block.get_submodule(names[0]).in_features)
                passes.feed(names[0], hessian.add)
                quantize_group(i, block, names, hessian)
            states = passes.outputs()
        else:
            hessians = {names[0]: Hessian(block.get_submodule(names[0]).in_features) for names in groups}
            with capture_inputs(block, list(hessians), lambda name, x, hs=hessians: hs[name].add(x)):
                run_block(block, states)
            for names in groups:
                quantize_group(i, block, names, hessians[names[0]])
            states = run_block(block, states)
    quantize_model(model, "int4", group_size, bits=bits, int4_layers=done)
    model.quantization["method"] = "gptq"
    return model
