"""Start-up: building the ``scratchlm`` parser imports neither torch nor numpy (about 2.4 s of CPU per command
otherwise, ``--help`` included), and the faster load paths give exactly what the plain ones gave: GGUF tensors
read with torch and numpy equal the `gguf` package's dequantization bit for bit, on every type we read natively
and on the whole pulled SmolLM2; the command's load path imports no `gguf` package and freezes the collector."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from export_helpers import export_llm
from scratchlm import cli_options, sampling
from scratchlm.formats.export_gguf import export_gguf
from scratchlm.formats.gguf import (
    _canonical_name,
    _int8_rows,
    _tensor_to_torch,
    load_gguf_quantized,
    read_gguf,
    unpermute_qk,
)
from scratchlm.quant.int4 import dequantize_int4
from scratchlm.quant.int8 import quantize_int8

Q = gguf.GGMLQuantizationType

PARSER_IMPORTS = """
import contextlib, io, sys
from scratchlm.cli import build_parser, main
build_parser()
for argv in (["--help"], ["data", "clean", "--help"], ["generate", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        main(argv)
    assert "usage: scratchlm" in out.getvalue(), argv
print(sorted(m for m in ("torch", "numpy", "scratchlm.sampling", "scratchlm.llm") if m in sys.modules))
"""


def test_building_the_parser_and_help_import_no_torch():
    done = subprocess.run([sys.executable, "-c", PARSER_IMPORTS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"the parser imported {done.stdout.strip()}"


def test_the_help_texts_show_the_sampling_defaults_llm_applies():
    assert cli_options.DEFAULT_SAMPLING == sampling.DEFAULT_SAMPLING


# ---- GGUF tensors read without the gguf package, bit for bit what it computes -------------------------------------
def write_types(path, rows: int = 48, cols: int = 256):
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    values = {}
    for kind in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"):
        x = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3, (rows, 1))).astype(np.float32)
        x[0, :32] = 0  # an all-zero block: scale 0
        if kind == "F32":
            w.add_tensor(kind, x)
        elif kind == "F16":
            w.add_tensor(kind, x.astype(np.float16))
        else:
            w.add_tensor(kind, gguf.quants.quantize(x, Q[kind]), raw_dtype=Q[kind])
        values[kind] = x
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


def test_tensors_read_natively_equal_the_gguf_package_bit_for_bit(tmp_path):
    write_types(tmp_path / "types.gguf")
    reader, _ = read_gguf(tmp_path / "types.gguf")
    for t in reader.tensors:
        want = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, Q[t.name]), dtype=np.float32))
        got = _tensor_to_torch(t, tmp_path)
        assert got.dtype == torch.float32 and torch.equal(got, want), t.name
        if t.name.startswith("Q"):  # int8 rows made from the blocks, in chunks: as from the whole float matrix
            for chunk in (4096, 5):
                qweight, scales = _int8_rows(t, chunk)
                want_q, want_s = quantize_int8(want)
                assert torch.equal(qweight, want_q) and torch.equal(scales, want_s), (t.name, chunk)


def test_quantize_int8_keeps_its_rounding():
    w = torch.tensor([[1.0, -0.5, 0.25, 127.0, -127.0], [0.0, 0.0, 0.0, 0.0, 0.0], [2.5, -2.5, 1.0, 0.5, -0.49]])
    q, s = quantize_int8(w)
    assert s.tolist()[0] == 1.0 and s[1] > 0 and s.tolist()[2] == pytest.approx(2.5 / 127)
    assert q.tolist() == [[1, 0, 0, 127, -127], [0, 0, 0, 0, 0], [127, -127, 51, 25, -25]]  # half to even: -0.5 -> 0


def test_smollm2_loads_what_the_gguf_package_dequantizes(smollm2_path):
    """The pulled file's tensors against gguf's own dequantization (the embedding, the norms and three whole layers;
    gguf takes seconds for all 30): 4-bit layers as int4 codes whose q * scale + min is gguf's float bit for bit
    (rows in HF's rotate-half order), the Q8_0 embedding as int8 rows of gguf's floats, the norms as they are."""
    config, state, _, quantized = load_gguf_quantized(smollm2_path)
    assert quantized
    reader, _ = read_gguf(smollm2_path)
    layers = {0, config.n_layers // 2, config.n_layers - 1}
    checked = set()
    for t in reader.tensors:
        name = _canonical_name(t.name)
        prefix, _, leaf = name.rpartition(".")
        if name.startswith("blocks.") and int(name.split(".")[1]) not in layers and "norm" not in name:
            continue
        want = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        if t.tensor_type.name == "Q8_0":
            q, s = quantize_int8(want)
            assert torch.equal(state[f"{prefix}.qweight"], q) and torch.equal(state[f"{prefix}.scales"], s), name
        elif t.tensor_type.name == "F32":
            assert torch.equal(state[name], want), name
        else:
            if prefix.endswith(("q_proj", "k_proj")):
                want = unpermute_qk(want, config.n_heads if prefix.endswith("q_proj") else config.n_kv_heads)
            got = dequantize_int4(*(state[f"{prefix}.{k}"] for k in ("qweight", "scales", "mins")), 32)
            assert torch.equal(got, want), name
        checked.add(t.tensor_type.name)
    assert checked == {"Q8_0", "F32", "Q4_1"}


COMMAND = """
import gc, json, sys
from scratchlm.cli import main
main(["generate", sys.argv[1], "Hi", "--max-new-tokens", "1", "--no-progress", "--threads", "1"])
print(json.dumps({"gguf": "gguf" in sys.modules, "frozen": gc.get_freeze_count(), "enabled": gc.isenabled()}))
"""


def test_the_command_reads_a_q4_gguf_without_the_gguf_package_and_freezes_what_it_loaded(tmp_path):
    path = export_gguf(export_llm("llama"), tmp_path / "m.gguf", "q4_1")
    done = subprocess.run([sys.executable, "-c", COMMAND, str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SCRATCHLM_COMPILE": "0"})
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    # importing gguf costs 0.15 s of CPU; frozen objects are skipped by the collector, the exit's pass included
    assert facts == {"gguf": False, "frozen": facts["frozen"], "enabled": True} and facts["frozen"] > 50_000


def test_llm_load_runs_without_collector_passes_and_restores_the_collector(tmp_path):
    from scratchlm.llm import LLM

    path = export_gguf(export_llm("llama"), tmp_path / "m.gguf", "q4_1")
    passes = []
    gc.callbacks.append(record := lambda phase, info: passes.append(phase))
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            gc.collect()
            passes.clear()
            LLM.load(path, compile=False)
            assert passes == [] and gc.isenabled() == enabled
    finally:
        gc.callbacks.remove(record)
        gc.enable()
