"""`scratchlm train --parallel ...` from the command line: mesh checks, two torchrun "nodes" on one machine, a
resume with one process, the layout recorded in run.json, a rank that dies.

The equivalence of every mode with one process is in test_parallel.py; this file checks what a user sees.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from scratchlm.cli import main
from scratchlm.config import ModelConfig
from scratchlm.errors import ConfigError, UnsupportedError
from scratchlm.train.parallel.mesh import ParallelConfig, check_backend
from scratchlm.train.sources import bundled_corpus

TINY = ["--context-length", "16", "--n-layers", "2", "--n-heads", "2", "--d-model", "32", "--batch-size", "8",
        "--eval-batches", "2", "--warmup-steps", "2", "--lr", "3e-3", "--min-lr", "3e-4", "--no-progress",
        "--sample-tokens", "0", "--eval-interval", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(bundled_corpus().read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    return path


def step_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(out: Path, *args: str) -> list[subprocess.Popen]:
    """Two torchrun launches of one process each, as two nodes meeting at a rendezvous on 127.0.0.1."""
    port = free_port()
    return [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
         "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "--max-restarts", "0", "-m", "scratchlm.cli", "train", "--out", str(out), *args],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for rank in (0, 1)]


def workers(node: subprocess.Popen) -> list[int]:
    """The worker processes a torchrun agent started (each in a session of its own, so not in the agent's group)."""
    pids = []
    for task in Path(f"/proc/{node.pid}/task").iterdir():
        try:
            pids += [int(pid) for pid in (task / "children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            pass
    return pids


def stop(nodes: list[subprocess.Popen]) -> None:
    """Kill what is left of the launches: the workers, then the torchrun agents."""
    for node in nodes:
        if node.poll() is None:
            for pid in workers(node):
                os.kill(pid, signal.SIGKILL)
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()


# ---- the layout is checked before anything runs ------------------------------------------------------------------
def test_a_mesh_that_does_not_fit_says_what_to_change():
    llama = ModelConfig(vocab_size=64, context_length=16, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=96)
    with pytest.raises(ConfigError, match=r"world size 6 does not factor into --tp 4"):
        ParallelConfig(mode="tp", tp=4).shape(6)
    with pytest.raises(ConfigError, match=r"n_kv_heads \(2\) over --tp 4"):
        ParallelConfig(mode="tp", tp=4).check(4, llama, batch_size=8)
    with pytest.raises(ConfigError, match=r"3 layers do not divide by 2"):
        ParallelConfig(mode="pp", pp=2).check(2, llama, batch_size=8)
    with pytest.raises(ConfigError, match=r"--batch-size 6 does not divide over 4"):
        ParallelConfig(mode="fsdp").check(4, llama, batch_size=6)
    with pytest.raises(ConfigError, match=r"--tp 2 needs --parallel tp or fsdp\+tp"):
        ParallelConfig(mode="fsdp", tp=2)
    with pytest.raises(ConfigError, match="micro-batches"):
        ParallelConfig(mode="pp", microbatches=4).check(3, llama, batch_size=6)
    with pytest.raises(ConfigError, match=r"1F1B schedule needs at least as many micro-batches as stages \(2\)"):
        ParallelConfig(mode="pp", microbatches=1).check(2, llama.replace(n_layers=2), batch_size=8)
    ParallelConfig(mode="pp", microbatches=1, schedule="gpipe").check(2, llama.replace(n_layers=2), batch_size=8)
    assert ParallelConfig(mode="fsdp+tp", tp=2).check(8, llama.replace(n_heads=8, n_kv_heads=4, head_dim=8),
                                                      batch_size=8) == {"dp": 4, "tp": 2}


def test_a_mode_that_needs_a_missing_backend_says_so():
    if dist.is_nccl_available():  # a CUDA build: the check passes
        check_backend("cuda")
    else:
        with pytest.raises(UnsupportedError, match="NCCL"):
            check_backend("cuda")
    check_backend("cpu")  # gloo is in every build we support


def test_the_cli_refuses_a_world_size_that_does_not_factor(data, tmp_path, capsys):
    assert main(["train", str(data), "--out", str(tmp_path / "x"), "--parallel", "tp", "--tp", "2", *TINY]) == 2
    err = capsys.readouterr().err
    assert "world size 1 does not factor into --tp 2" in err and "Traceback" not in err


# ---- two nodes on one machine -------------------------------------------------------------------------------------
def test_two_torchrun_nodes_train_fsdp_like_one_process_and_one_process_resumes_the_sharded_checkpoint(
        data, tmp_path, capsys):
    from safetensors.torch import load_file

    from scratchlm.llm import LLM

    nodes = two_nodes(tmp_path / "nodes", str(data), "--max-steps", "8", "--parallel", "fsdp", *TINY)
    try:
        assert main(["train", str(data), "--out", str(tmp_path / "one"), "--max-steps", "8", *TINY]) == 0
        outputs = [node.communicate(timeout=900)[0] for node in nodes]
    finally:
        stop(nodes)
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)[-6000:]
    assert "parallel: fsdp, mesh {'dp': 2}" in outputs[0]
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "nodes")
    assert sorted(two) == list(range(1, 9))
    assert max(abs(one[s] - two[s]) for s in one) < 1e-4
    assert (tmp_path / "nodes" / "last" / "distcp" / ".metadata").is_file()
    layout = json.loads((tmp_path / "nodes" / "run.json").read_text())["layout"]
    assert layout["world_size"] == 2 and layout["parallel"]["mode"] == "fsdp"

    # One process continues both runs: the 2-rank shards load into whole tensors, at the saved data position.
    capsys.readouterr()
    for name in ("one", "nodes"):
        assert main(["train", "--out", str(tmp_path / name), "--resume", "--max-steps", "12", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert said.count("layout changed") == 1  # the one-process run resumes as it was
    assert "layout changed: saved by fsdp over 2 processes, resumed on one process" in said
    assert json.loads((tmp_path / "nodes" / "run.json").read_text())["layout"] == {"world_size": 1, "parallel": None}
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "nodes")
    assert sorted(two) == list(range(1, 13))
    assert max(abs(one[s] - two[s]) for s in range(9, 13)) < 1e-4
    # The final model loads (and so exports) like any other run's.
    llm = LLM.load(tmp_path / "nodes" / "last")
    for key, value in load_file(tmp_path / "one" / "last" / "model.safetensors").items():
        torch.testing.assert_close(llm.model.state_dict()[key], value, atol=1e-5, rtol=1e-4)


# ---- a rank that dies -------------------------------------------------------------------------------------------
def test_a_rank_that_dies_ends_the_other_with_a_one_line_message_long_before_the_timeout(data, tmp_path):
    """Rank 1 is killed (SIGKILL) once the first evaluation is in metrics.jsonl; rank 0's next collective finds the
    connection closed and ends with exit code 2 and the one-line message. The processes are started as torchrun
    starts its workers (RANK, WORLD_SIZE, MASTER_ADDR/PORT), without its agent, which would stop the survivor
    itself: this is what a rank on another node sees. The timeout (900 s) is long enough for any rendezvous under
    load; the failure must come from the closed connection, before it."""
    port, out = free_port(), tmp_path / "run"
    ranks = [subprocess.Popen(
        [sys.executable, "-m", "scratchlm.cli", "train", str(data), "--out", str(out), "--max-steps", "100000",
         "--dist-timeout", "900", *TINY, "--eval-interval", "2"],
        env={**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    try:
        deadline = time.monotonic() + 900
        while not (out / "metrics.jsonl").is_file() or '"val_loss"' not in (out / "metrics.jsonl").read_text():
            assert time.monotonic() < deadline and all(r.poll() is None for r in ranks), "no evaluation was written"
            time.sleep(0.1)
        ranks[1].kill()
        killed = time.monotonic()
        _, err = ranks[0].communicate(timeout=1200)
        elapsed = time.monotonic() - killed
    finally:
        for r in ranks:
            if r.poll() is None:
                r.kill()
            r.communicate()
    assert ranks[0].returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: process 0 of 2: a collective failed (") and "another process probably died" in last
    assert elapsed < 900, elapsed  # the closed connection, not the timeout
