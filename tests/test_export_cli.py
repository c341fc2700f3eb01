"""`scratchlm convert` end to end, and every kind of bad input: one-line errors, exit code 2, and never a
partial output."""

from __future__ import annotations

import pytest
import torch

from export_helpers import TEXT, export_llm, logits
from scratchlm.cli import main
from scratchlm.convert import convert
from scratchlm.errors import ScratchLMError
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.llm import LLM


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["convert", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    return lines[0]


@pytest.fixture
def checkpoint(tmp_path):
    """A scratchlm model directory (what `scratchlm train` writes) and the LLM it holds."""
    llm = export_llm("gpt2")
    path = save_model_dir(tmp_path / "ckpt", llm.config, llm.model.canonical_state_dict(), llm.tokenizer,
                          llm.template.source)
    return path, llm


def test_checkpoint_to_gguf_to_hf_to_onnx(tmp_path, capsys, checkpoint):
    source, llm = checkpoint
    ids = llm.tokenizer.encode(TEXT)
    code, out, _ = run(capsys, source, "--to", "gguf", "--gguf-type", "f32", "--out", tmp_path / "a" / "m.gguf")
    assert code == 0 and out.startswith("wrote ")
    code, _, _ = run(capsys, tmp_path / "a" / "m.gguf", "--to", "hf", "--out", tmp_path / "hf")
    assert code == 0
    code, _, _ = run(capsys, tmp_path / "hf", "--to", "onnx", "--seq-len", "8", "--out", tmp_path / "m.onnx")
    assert code == 0 and (tmp_path / "m.onnx").stat().st_size > 0
    assert torch.equal(logits(LLM.load(tmp_path / "hf"), ids), logits(llm, ids))


def test_existing_output_needs_force(tmp_path, capsys, checkpoint):
    source, _ = checkpoint
    target = tmp_path / "m.gguf"
    target.write_bytes(b"precious")
    code, _, err = run(capsys, source, "--to", "gguf", "--out", target)
    assert code == 2 and "already exists; pass --force" in error_line(err)
    assert target.read_bytes() == b"precious"
    code, _, _ = run(capsys, source, "--to", "gguf", "--out", target, "--force")
    assert code == 0 and target.read_bytes()[:4] == b"GGUF"
    # --force never turns a directory that is not a model into an export
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    code, _, err = run(capsys, source, "--to", "hf", "--out", tmp_path / "docs", "--force")
    assert code == 2 and "does not hold a model" in error_line(err)
    assert (tmp_path / "docs" / "notes.txt").read_text() == "mine"
    code, _, err = run(capsys, source, "--to", "hf", "--out", target, "--force")
    assert code == 2 and "is a file" in error_line(err)


def test_force_replaces_a_previous_hf_export(tmp_path, capsys, checkpoint):
    source, llm = checkpoint
    assert run(capsys, source, "--to", "hf", "--out", tmp_path / "hf")[0] == 0
    assert run(capsys, source, "--to", "hf", "--out", tmp_path / "hf", "--dtype", "bfloat16", "--force")[0] == 0
    assert '"torch_dtype": "bfloat16"' in (tmp_path / "hf" / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no temporary leftovers


@pytest.mark.parametrize(("changes", "to", "extra", "message"), [
    (dict(norm="layernorm"), "hf", [], "mixes positions=rope, norm=layernorm, mlp=swiglu"),
    (dict(norm="layernorm"), "gguf", [], "cannot be exported"),
    (dict(d_model=48, n_heads=4, n_kv_heads=2, d_ff=96), "gguf", ["--gguf-type", "q4_1"], "blocks of 32 values"),
    ({}, "gguf", ["--dtype", "float16"], "--dtype applies to --to hf only; use --gguf-type"),
    ({}, "hf", ["--gguf-type", "q8_0"], "--gguf-type applies to --to gguf only"),
])
def test_target_the_model_cannot_take(tmp_path, capsys, changes, to, extra, message):
    llm = export_llm("llama", **changes)
    source = save_model_dir(tmp_path / "src", llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    code, _, err = run(capsys, source, "--to", to, "--out", tmp_path / "out", *extra)
    assert code == 2 and message in error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_gpt2_with_grouped_query_attention_is_refused(tmp_path):
    llm = export_llm("gpt2", n_kv_heads=2)
    with pytest.raises(ScratchLMError, match="GPT-2 has no grouped-query attention"):
        from scratchlm.formats.export_hf import export_hf

        export_hf(llm, tmp_path / "out")


def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize(("to", "target"), [("gguf", "gguf.GGUFWriter.write_tensors_to_file"),
                                            ("hf", "safetensors.torch.save_file"),
                                            ("onnx", "torch.onnx.ONNXProgram.save")])
def test_failed_write_leaves_nothing(tmp_path, capsys, monkeypatch, checkpoint, to, target):
    source, _ = checkpoint
    monkeypatch.setattr(target, disk_full)
    out = tmp_path / "new" / "deeper" / "model"
    code, _, err = run(capsys, source, "--to", to, "--out", out)
    assert code == 2
    assert error_line(err) == f"error: could not write {out}: No space left on device; nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # not even the parent folders
    # With --force, the previous export survives a failed replacement.
    out.parent.mkdir(parents=True)
    out.mkdir() if to == "hf" else out.write_bytes(b"old")
    if to == "hf":
        (out / "config.json").write_text("{}")
    assert run(capsys, source, "--to", to, "--out", out, "--force")[0] == 2
    assert (out / "config.json").read_text() == "{}" if to == "hf" else out.read_bytes() == b"old"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    """Not only OS errors: any exception (a bug, Ctrl-C) removes the temporary file."""
    import gguf

    from scratchlm.formats.export_gguf import export_gguf

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(export_llm("llama"), tmp_path / "m.gguf")
    assert not any(tmp_path.iterdir())


def test_unreadable_sources_name_the_file(tmp_path, capsys, checkpoint):
    source, llm = checkpoint
    out = tmp_path / "out.gguf"
    missing = tmp_path / "nope" / "model.gguf"
    code, _, err = run(capsys, missing, "--to", "gguf", "--out", out)
    assert code == 2 and f"no such file or directory: {missing}" in error_line(err)

    good = convert(source, "gguf", tmp_path / "good.gguf", gguf_type="f32")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code, _, err = run(capsys, truncated, "--to", "hf", "--out", tmp_path / "hf")
    assert code == 2 and str(truncated) in error_line(err) and "truncated or corrupt" in err

    weights = source / "model.safetensors"
    weights.write_bytes(b"\x00" * 16)
    code, _, err = run(capsys, source, "--to", "gguf", "--out", out)
    assert code == 2 and str(weights) in error_line(err) and "not a readable safetensors file" in err

    hf = convert(good, "hf", tmp_path / "hf")
    (hf / "tokenizer.json").unlink()
    code, _, err = run(capsys, hf, "--to", "gguf", "--out", out)
    assert code == 2 and f"missing tokenizer file: {hf / 'tokenizer.json'}" in error_line(err)
    (hf / "config.json").write_text("{not json")
    code, _, err = run(capsys, hf, "--to", "gguf", "--out", out)
    assert code == 2 and f"{hf / 'config.json'} is not valid JSON" in error_line(err)
    assert not out.exists()


def test_outputs_get_ordinary_permissions(tmp_path, checkpoint):
    """Temporary files are private (0600); the finished export has the mode a plain write would give."""
    import os
    import stat

    source, _ = checkpoint
    mask = os.umask(0o022)
    try:
        gguf = convert(source, "gguf", tmp_path / "m.gguf", gguf_type="f32")
        hf = convert(source, "hf", tmp_path / "hf")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(gguf.stat().st_mode) == 0o644
    assert stat.S_IMODE(hf.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in hf.iterdir()} == {0o644}
