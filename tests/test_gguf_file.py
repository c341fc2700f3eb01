"""Our GGUF container reader (formats.gguf_file) against the gguf package's GGUFReader: the same metadata and
the same tensor records, on a file with every value type and on the pulled SmolLM2; bad files get clear errors."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from scratchlm.errors import ModelFileError
from scratchlm.formats.gguf import read_gguf
from scratchlm.formats.gguf_file import GGUFFile


def reference(path):
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return reader, meta


def assert_same(path):
    ours = GGUFFile(path)
    reader, meta = reference(path)
    nested = {k for k, v in ours.metadata.items() if isinstance(v, list) and v and isinstance(v[0], list)}
    # the gguf package flattens arrays of arrays (its contents() concatenates the parts); we keep the nesting
    assert {k: v for k, v in ours.metadata.items() if k not in nested} == {k: v for k, v in meta.items()
                                                                           if k not in nested}
    assert all(sum(ours.metadata[k], []) == meta[k] for k in nested)
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
    for a, b in zip(ours.tensors, reader.tensors):
        assert (a.tensor_type, list(a.shape), a.n_elements, a.n_bytes, a.data_offset) == \
            (b.tensor_type, list(b.shape), b.n_elements, b.n_bytes, b.data_offset), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data), a.name
    return ours


def write_every_type(path, alignment=None):
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁ wörld 🙂")
    w.add_array("t.strs", ["a", "", "Ġthe", "日本語", "\n"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 32)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("vec", np.arange(5, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_and_tensor_kind_equals_the_gguf_reader(tmp_path, alignment):
    ours = assert_same(write_every_type(tmp_path / "all.gguf", alignment))
    assert ours.metadata["t.strs"][3] == "日本語" and ours.metadata["t.u64"] == 2**63 + 5
    assert ours.metadata["t.nested"] == [[1, 2], [3]]
    assert ours.tensors[2].data.shape == (4, 68)  # Q8_0: rows of 2 blocks of 34 bytes


def test_smollm2_file_equals_the_gguf_reader(smollm2_path):
    ours = assert_same(smollm2_path)
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152


@pytest.mark.parametrize("cut", [3, 20, 200, -100])
def test_truncated_or_foreign_files_get_one_line_errors(tmp_path, cut):
    good = write_every_type(tmp_path / "all.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good[:cut])
    with pytest.raises(ModelFileError, match="not a readable GGUF file"):
        read_gguf(bad)


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        read_gguf(bad)
