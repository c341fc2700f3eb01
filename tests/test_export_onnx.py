"""ONNX export of the forward pass, run in ONNX Runtime against our logits."""

from __future__ import annotations

import pytest
import torch

from export_helpers import export_llm
from scratchlm.errors import ConfigError
from scratchlm.formats.onnx import export_onnx

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # llama: grouped-query attention (4 heads, 2 KV heads)
def test_onnxruntime_matches_our_logits(tmp_path, kind):
    llm = export_llm(kind)
    path = export_onnx(llm, tmp_path / "m.onnx", batch_size=2, seq_len=24)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape, out.name) == ("input_ids", [2, 24], "logits")
    ids = torch.randint(0, llm.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    (theirs,) = session.run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        ours = llm.model(ids)
    assert theirs.shape == (2, 24, llm.config.vocab_size)
    torch.testing.assert_close(torch.from_numpy(theirs), ours, atol=1e-5, rtol=1e-5)


def test_rejects_shapes_beyond_the_context(tmp_path):
    with pytest.raises(ConfigError, match="seq_len <= 128"):
        export_onnx(export_llm("llama"), tmp_path / "m.onnx", seq_len=129)
    assert not any(tmp_path.iterdir())
