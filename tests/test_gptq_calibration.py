"""Calibration data (quant/calibration.py): text -> token windows, and block-by-block inputs."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llm
from scratchlm.errors import DataError
from scratchlm.quant.calibration import block_inputs, block_linears, calibration_tokens, capture_inputs, run_block

pytestmark = pytest.mark.usefixtures("one_thread")


def test_calibration_windows_are_non_overlapping_pieces_of_the_text(tmp_path):
    llm = tiny_llm()
    text = "".join(f"line {i}: to be or not to be.\n" for i in range(200))
    path = tmp_path / "calib.txt"
    path.write_text(text)
    tokens = calibration_tokens(llm.tokenizer, path, samples=8, seq_len=64, seed=1)
    ids = llm.tokenizer.encode(text)
    assert tokens.shape == (8, 64)
    starts = []
    for row in tokens.tolist():
        start = next(s for s in range(0, len(ids) - 63, 64) if ids[s : s + 64] == row)
        starts.append(start)
    assert len(set(starts)) == 8  # distinct windows
    assert not torch.equal(tokens, calibration_tokens(llm.tokenizer, path, samples=8, seq_len=64, seed=2))


def test_too_little_calibration_text_is_a_one_line_error(tmp_path):
    llm = tiny_llm()
    path = tmp_path / "short.txt"
    path.write_text("only a few words")
    with pytest.raises(DataError) as err:
        calibration_tokens(llm.tokenizer, path, samples=4, seq_len=64)
    assert "enough for 0 calibration windows" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="not found"):
        calibration_tokens(llm.tokenizer, tmp_path / "missing.txt")


def test_running_blocks_one_by_one_reproduces_the_model():
    llm = tiny_llm()
    tokens = torch.randint(0, 260, (5, 32), generator=torch.Generator().manual_seed(0))
    states = block_inputs(llm.model, tokens, batch_size=2)  # batches of 2, 2 and 1 rows
    seen = {}
    for block in llm.model.blocks:
        names = [n for group in block_linears(block) for n in group]
        with capture_inputs(block, names, lambda name, x: seen.setdefault(name, []).append(x.shape)):
            states = run_block(block, states)
    with torch.no_grad():
        logits = torch.cat([llm.model.logits(llm.model.final_norm(h)) for h in states.hidden])
        assert torch.equal(logits, llm.model(tokens))
    assert seen["mlp.down_proj"][0] == (2, 32, 160) and len(seen["attn.q_proj"]) == 2 * 3
