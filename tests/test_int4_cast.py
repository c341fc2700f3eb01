"""int4_linear's activation conversions around the kernel: done in row blocks on one thread for decode-sized
tensors (``quant.int4.cast``), bit for bit the conversion PyTorch does in one call."""

from __future__ import annotations

import pytest
import torch

import scratchlm.quant.int4 as int4
from scratchlm.quant.int4 import GRAIN_SIZE, SERIAL_CAST_MAX, Int4Linear, cast


@pytest.mark.parametrize("shape", [(16, 3072), (1, 16, 3072), (3, 7, 4099), (16, 576), (64, 4096), (100000,)])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_cast_equals_to_bit_for_bit(shape, dtypes):
    source, target = dtypes
    t = (torch.randn(shape) * 1e3).to(source)
    t.view(-1)[::97] = float("inf")
    t.view(-1)[1::89] = 1e-40  # subnormal in float32
    got, want = cast(t, target), t.to(target)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.view(-1).view(torch.int16 if target == torch.bfloat16 else torch.int32),
                       want.view(-1).view(torch.int16 if target == torch.bfloat16 else torch.int32))


def test_the_serial_path_covers_decode_batches_and_stops_where_rows_pay_for_threads():
    assert GRAIN_SIZE < 16 * 3072 <= SERIAL_CAST_MAX < 128 * 3072


def test_int4_layer_output_is_unchanged_by_the_row_blocks():
    torch.manual_seed(0)
    layer = Int4Linear.from_linear(torch.nn.Linear(576, 3072, bias=True), group_size=32)
    x = torch.randn(16, 1, 576)  # a decode step of 16 rows: a [16, 1, 3072] product, over the grain
    got = layer(x)
    saved, int4.SERIAL_CAST_MAX = int4.SERIAL_CAST_MAX, 0  # every conversion in one call, as before
    try:
        want = layer(x)
    finally:
        int4.SERIAL_CAST_MAX = saved
    assert got.dtype == torch.float32 and torch.equal(got, want)
