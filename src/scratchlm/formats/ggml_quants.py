"""ggml's block quantization formats Q8_0, Q4_0 and Q4_1, written out for export to GGUF; 4-bit blocks read back.

Each row of a weight matrix is cut into blocks of 32 values; a block stores one or two float16 numbers
(its scale ``d``, and for Q4_1 its minimum ``m``) followed by 32 small integers:

    Q8_0  (34 bytes)  x ~ d * q,      q in [-127, 127] (int8),  d = max|x| / 127
    Q4_0  (18 bytes)  x ~ d * (q - 8), q in [0, 15] (4 bits),  d = (value of largest |x|) / -8
    Q4_1  (20 bytes)  x ~ d * q + m,  q in [0, 15] (4 bits),   d = (max - min) / 15, m = min

Two 4-bit values share a byte: byte j of a block holds q[j] in its low nibble and q[j + 16] in its
high nibble. The arithmetic follows ggml's reference quantizers (``quantize_row_*_ref`` in
ggml-quants.c) step by step in float32, so the bytes equal those of llama.cpp's converter and of the
``gguf`` package's ``gguf.quants.quantize``; ``tests/test_export_gguf.py`` checks both that and the
error bound of each format through ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import numpy as np
import torch

from scratchlm.errors import UnsupportedError

BLOCK_SIZE = 32
# Bytes per block of 32 values.
BLOCK_BYTES = {"q8_0": 2 + 32, "q4_0": 2 + 16, "q4_1": 2 + 2 + 16}


def _blocks(w: torch.Tensor, kind: str) -> torch.Tensor:
    """A 2-D float32 view [n_blocks, 32] of ``w``'s rows, or an error if a row does not fill whole blocks."""
    if w.ndim < 1 or w.shape[-1] % BLOCK_SIZE:
        raise UnsupportedError(
            f"{kind.upper()} packs each row in blocks of {BLOCK_SIZE} values, but this tensor's rows have "
            f"{w.shape[-1] if w.ndim else 0} values; export it as f16 or f32"
        )
    return w.detach().to(torch.float32).reshape(-1, BLOCK_SIZE)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (halves away from zero); torch.round rounds halves to even, which ggml does not."""
    a = x.abs()
    whole = a.floor()
    return torch.sign(x) * (whole + (a - whole >= 0.5).to(x.dtype))  # a - whole is exact in float32


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1 / d, with 0 for all-zero blocks (ggml's ``id = d ? 1.0f/d : 0.0f``)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 1] -> the 2 little-endian bytes of its float16 value, [n, 2] uint8."""
    return x.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] values in 0..15 -> [n, 16] bytes: low nibble q[j], high nibble q[j + 16]."""
    q = q.to(torch.uint8)
    return q[:, :16] | (q[:, 16:] << 4)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks of ``w`` as uint8 [n_blocks, 34]."""
    x = _blocks(w, "q8_0")
    d = x.abs().amax(dim=1, keepdim=True) / 127
    q = _round_half_away(x * _inverse(d)).to(torch.int8)
    return torch.cat([_f16_bytes(d), q.view(torch.uint8)], dim=1)


def quantize_q4_0(w: torch.Tensor) -> torch.Tensor:
    """Q4_0 blocks of ``w`` as uint8 [n_blocks, 18]."""
    x = _blocks(w, "q4_0")
    # The signed value of largest magnitude (the first one on ties) maps to q = 0, i.e. -8 * d.
    peak = x.gather(1, x.abs().argmax(dim=1, keepdim=True))
    d = peak / -8
    # ggml: MIN(15, (int8_t)(x * id + 8.5f)); the cast truncates toward zero.
    q = torch.trunc(x * _inverse(d) + 8.5).clamp(0, 15)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], dim=1)


def quantize_q4_1(w: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks of ``w`` as uint8 [n_blocks, 20]."""
    x = _blocks(w, "q4_1")
    low = x.amin(dim=1, keepdim=True)
    high = x.amax(dim=1, keepdim=True)
    d = (high - low) / 15
    # ggml: MIN(15, (int8_t)((x - min) * id + 0.5f)).
    q = torch.trunc((x - low) * _inverse(d) + 0.5).clamp(0, 15)
    return torch.cat([_f16_bytes(d), _f16_bytes(low), _pack_nibbles(q)], dim=1)


QUANTIZERS = {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0, "q4_1": quantize_q4_1}


def quantize(w: torch.Tensor, kind: str) -> np.ndarray:
    """``w`` [rows, cols] in ggml format ``kind`` as a uint8 array [rows, cols / 32 * block bytes].

    That byte shape is what ``gguf.GGUFWriter.add_tensor(..., raw_dtype=...)`` expects for a quantized tensor.
    """
    if kind not in QUANTIZERS:
        raise UnsupportedError(f"unknown ggml quantization {kind!r}; choose one of {', '.join(QUANTIZERS)}")
    blocks = QUANTIZERS[kind](w)
    rows = w.shape[:-1]
    return blocks.reshape(*rows, -1).numpy()


# ---- reading: blocks -> torch tensors, in a few vectorised passes over the mapped file -------------------------
# Every 4-bit ggml format stores, per group of 32 weights, codes q in 0..15 with one step and one offset:
#     Q4_0  x = d * (q - 8)             step d, offset -8d      (fp16 d)
#     Q4_1  x = d * q + m               step d, offset m        (fp16 d, m)
#     Q4_K  x = (d * sc) * q - dmin * mn  per 32-weight sub-block of a 256-weight super-block (6-bit sc, mn)
# which is exactly scratchlm's int4 form ``q * scale + min`` at group size 32, so these tensors load as int4
# with the file's own codes: the float32 weights ``q * scale + min`` equal gguf's dequantization bit for bit
# (each product of a float16 and a small integer is exact in float32, and the sum rounds the same way).
INT4_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q4_K")
INT4_GROUP_SIZE = 32
# Block types read here without the gguf package (the others go through gguf.quants.dequantize).
NATIVE_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q8_0")


def _block_words(data: np.ndarray, block_bytes: int) -> np.ndarray:
    """A tensor's blocks as little-endian 16-bit words [n_blocks, block_bytes / 2] (every ggml block has an even
    size), a view of ``data`` (the mapped file)."""
    return np.ascontiguousarray(data).view("<u2").reshape(-1, block_bytes // 2)


def _f16_column(words: np.ndarray, at: int) -> np.ndarray:
    """The float16 stored in word ``at`` of every block, as float32 [n_blocks]."""
    return words[:, at].view(np.float16).astype(np.float32)


def _portable_codes(words: np.ndarray, header: int) -> np.ndarray:
    """ggml's 16 code bytes per block (low nibbles: codes 0..15, high nibbles: codes 16..31), the 8 words after
    ``header`` words -> the 16 bytes of scratchlm's portable order (byte j: code 2j low, code 2j + 1 high).

    Word k of the codes holds the bytes 2k and 2k + 1, so its two low nibbles are codes 2k and 2k + 1 (portable
    byte k) and its two high nibbles codes 2k + 16 and 2k + 17 (portable byte k + 8): nibble pairs move within
    a word, one pass per half. numpy, not torch: its strided integer loops were 4-8x faster on these shapes."""
    out = np.empty((words.shape[0], 16), dtype=np.uint8)
    for half, shifted in ((out[:, :8], words), (out[:, 8:], words >> 4)):
        nibbles = shifted & 0x0F0F  # byte 2k's nibble in bits 0-3, byte 2k + 1's in bits 8-11
        nibbles |= nibbles >> 4  # ... and now also in bits 4-7
        np.bitwise_and(nibbles[:, header:], 0xFF, out=half, casting="unsafe")
    return out


def int4_from_blocks(data: np.ndarray, kind: str, rows: int, cols: int,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw ``kind`` blocks of a [rows, cols] matrix -> ``(qweight, scales, mins)`` in scratchlm's portable int4
    format at group size 32 (``quant.int4``)."""
    groups = cols // INT4_GROUP_SIZE
    if kind in ("Q4_0", "Q4_1"):
        header = 1 if kind == "Q4_0" else 2  # words: d, or d and m
        words = _block_words(data, 2 * header + 16)
        scales = _f16_column(words, 0)
        mins = -8 * scales if kind == "Q4_0" else _f16_column(words, 1)
        return tuple(torch.from_numpy(a).view(rows, -1) for a in (_portable_codes(words, header), scales, mins))
    if kind != "Q4_K":
        raise UnsupportedError(f"{kind} is not a 4-bit block format; these are: {', '.join(INT4_BLOCK_TYPES)}")
    from gguf.quants import Q4_K

    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    blocks = raw.reshape(-1, 144)  # d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 bytes of codes
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = Q4_K.get_scale_min(blocks[:, 4:16].copy())
    scales = (d * sc.astype(np.float32)).reshape(-1)  # one per 32-weight sub-block
    mins = -(dmin * mn.astype(np.float32)).reshape(-1)
    # 128 bytes = 4 chunks of 32: low nibbles are sub-block 2i, high nibbles sub-block 2i + 1.
    qs = blocks[:, 16:].reshape(-1, 32)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)
    q = torch.from_numpy(codes)
    qweight = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    return (qweight, torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)).reshape(rows, groups),
            torch.from_numpy(np.ascontiguousarray(mins, dtype=np.float32)).reshape(rows, groups))


def dequantize_q8_0(data: np.ndarray, rows: int, cols: int) -> torch.Tensor:
    """Q8_0 blocks of a [rows, cols] matrix -> float32 ``d * q`` (exact: a float16 times an int8 fits float32's
    24-bit significand), what gguf's dequantization computes."""
    words = _block_words(data, 34)
    out = np.empty((words.shape[0], 32), dtype=np.float32)
    np.multiply(words[:, 1:].view(np.int8), _f16_column(words, 0)[:, None], out=out)
    return torch.from_numpy(out).view(rows, cols)


def dequantize_blocks(data: np.ndarray, kind: str, rows: int, cols: int) -> torch.Tensor:
    """A ``NATIVE_BLOCK_TYPES`` matrix as float32 [rows, cols], bit for bit what ``gguf.quants.dequantize``
    gives (tests/test_startup.py): Q8_0 as ``d * q``, Q4_0/Q4_1 as ``q * scale + min``."""
    if kind == "Q8_0":
        return dequantize_q8_0(data, rows, cols)
    qweight, scales, mins = int4_from_blocks(data, kind, rows, cols)
    codes = torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).view(rows, cols // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    return torch.addcmul(mins[..., None], codes.float(), scales[..., None]).view(rows, cols)
