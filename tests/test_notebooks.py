"""The course in notebooks/: every notebook runs top to bottom (tiny settings: SCRATCHLM_QUICK=1), and the committed
copies carry their outputs (so they read on GitHub) without errors or oversized pictures."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
NEEDS_MODELS = {"part4_prompting_tools_retrieval.ipynb"}  # against the local server with SmolLM2 and MiniLM


def test_the_course_is_there():
    assert [p.name[:5] for p in NOTEBOOKS] == [f"part{i}" for i in range(1, len(NOTEBOOKS) + 1)]
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_outputs_and_no_errors(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code and all(c.get("execution_count") for c in code), "execute it and commit it with its outputs"
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1)), "run top to bottom, once"
    for cell in code:
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error", "".join(output.get("traceback", []))[-2000:]
            png = output.get("data", {}).get("image/png")
            if png:
                assert len(base64.b64decode(png)) < 150_000, "keep pictures small (figure.dpi, figsize)"
    assert path.stat().st_size < 1_500_000


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, monkeypatch, tmp_path, request):
    import nbformat
    from nbclient import NotebookClient

    if path.name in NEEDS_MODELS:
        request.getfixturevalue("smollm2_path")
        request.getfixturevalue("minilm_path")
    monkeypatch.setenv("SCRATCHLM_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    # Executes in a scratch folder: anything a notebook writes outside its temporary directories lands there.
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                   ).execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_part4_stops_its_server_when_a_later_cell_fails(monkeypatch, tmp_path):
    """Part 4 starts `scratchlm serve` as a subprocess: a failing cell must not leave it running once the kernel
    ends (its atexit hook stops it). Run with the built-in test model, which loads no file."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = next(p for p in NOTEBOOKS if p.name == "part4_prompting_tools_retrieval.ipynb")
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    setup, start = code[0], next(c for c in code if "subprocess.Popen" in c.source)
    assert 'MODEL = "smollm2-135m-instruct"' in setup.source
    setup.source = setup.source.replace('MODEL = "smollm2-135m-instruct"', 'MODEL = "test-model"').replace(
        'for name in (MODEL, "all-minilm-l6-v2")', "for name in ()")
    failing = nbformat.v4.new_code_cell('print("server pid", server.pid)\nraise RuntimeError("a cell that fails")')
    notebook.cells = [setup, start, failing]
    monkeypatch.setenv("SCRATCHLM_QUICK", "1")
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(CellExecutionError, match="a cell that fails"):
        client.execute()  # nbclient shuts the kernel down after the error
    pid = int(next(o["text"] for o in notebook.cells[2].outputs if o.get("name") == "stdout").split()[-1])
    deadline = time.monotonic() + 30
    while _alive(pid):
        assert time.monotonic() < deadline, f"the server (pid {pid}) outlived the kernel"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
