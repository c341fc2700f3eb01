"""`scratchlm finetune --parallel ...` under torchrun (2 CPU processes, gloo) against one process.

One torchrun launch runs three fine-tunings of a tiny model in turn (full with dp, full with FSDP, LoRA with dp); the
tests compare each one's global loss in metrics.jsonl with the same fine-tuning in one process, load what rank 0
saved, and resume the FSDP run in one process (the layout change is said). The chat examples have different
numbers of learned tokens and the last batch of an epoch holds one example, so one rank's share is empty: the
per-replica weighting of the loss (finetune/parallel.py) is what makes the curves equal.

Run as a script, this file is the worker that torchrun starts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_llm
from scratchlm.cli import main
from scratchlm.formats.checkpoint import save_model_dir

WORDS = ["apple", "river", "stone", "cloud", "amber", "lemon", "tiger", "maple", "ocean", "piano", "candle", "forest",
         "a", "blue whale", "mountain pass"]
ROWS = [{"messages": [{"role": "user", "content": f"Repeat {i * 'please '}this: {w}"},
                      {"role": "assistant", "content": (w + " ") * (1 + i % 3)}]} for i, w in enumerate(WORDS)]
COMMON = ["--max-steps", "6", "--batch-size", "4", "--eval-interval", "3", "--val-fraction", "0.2", "--seed", "1",
          "--no-progress"]
JOBS = {  # name: the finetune flags after the base model
    "full_dp": ["--method", "full", "--lr", "1e-3", "--parallel", "dp"],
    "full_fsdp": ["--method", "full", "--lr", "1e-3", "--parallel", "fsdp"],
    "lora_dp": ["--method", "lora", "--rank", "4", "--lr", "1e-2"],  # under torchrun no flag means dp
}
# The same sums in another order (rows split over ranks, gradients averaged) differ only by float32 rounding; the
# issue's bound is 1e-4.
TOLERANCE = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")


def finetune_args(base: Path, data: Path, out: Path, name: str, one_process: bool = False) -> list[str]:
    """The command line of job ``name``; ``one_process``: without its --parallel flag, as a plain run."""
    flags = JOBS[name]
    if one_process and "--parallel" in flags:
        i = flags.index("--parallel")
        flags = flags[:i] + flags[i + 2:]
    return ["finetune", str(base), "--data", str(data), "--out", str(out / name), *COMMON, *flags]


def step_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def val_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every job twice: under torchrun with 2 processes (in ``parallel/``) and in this process (in ``one/``)."""
    from test_parallel import torchrun

    root = tmp_path_factory.mktemp("finetune_parallel")
    llm = tiny_llm("llama", seed=0)
    save_model_dir(root / "base", llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    torchrun(2, root, *JOBS, script=__file__)
    for name in JOBS:
        assert main(finetune_args(root / "base", root / "train.jsonl", root / "one", name, one_process=True)) == 0
    return root


@pytest.mark.parametrize("name", list(JOBS))
def test_two_processes_fine_tune_like_one(runs, name):
    one, two = step_losses(runs / "one" / name), step_losses(runs / "parallel" / name)
    assert sorted(two) == list(range(1, 7))
    assert one[6] < one[1] - 0.1  # it learns: the comparison is not of flat lines
    worst = max(abs(one[s] - two[s]) for s in one)
    assert worst < TOLERANCE, (name, worst)
    one_val, two_val = val_losses(runs / "one" / name), val_losses(runs / "parallel" / name)
    assert sorted(two_val) == [3, 6]
    assert max(abs(one_val[s] - two_val[s]) for s in one_val) < TOLERANCE
    layout = json.loads((runs / "parallel" / name / "run.json").read_text())["layout"]
    assert layout["world_size"] == 2
    assert (layout["parallel"] or {"mode": "dp"})["mode"] == ("fsdp" if "fsdp" in name else "dp")  # None: DDP


@pytest.mark.parametrize("name", ["full_dp", "full_fsdp"])
def test_the_model_rank_0_saved_loads_with_the_weights_one_process_trained(runs, name):
    from scratchlm.llm import LLM

    two, one = LLM.load(runs / "parallel" / name / "last"), LLM.load(runs / "one" / name / "last")
    for key, value in one.model.state_dict().items():
        torch.testing.assert_close(two.model.state_dict()[key], value, atol=1e-5, rtol=1e-4, msg=key)
    if name == "full_fsdp":  # written shard by shard, then made whole by rank 0
        assert (runs / "parallel" / name / "last" / "distcp" / ".metadata").is_file()


def test_the_lora_adapter_rank_0_saved_loads_in_peft_format(runs):
    from safetensors.torch import load_file

    from scratchlm.llm import LLM

    two, one = runs / "parallel" / "lora_dp" / "last", runs / "one" / "lora_dp" / "last"
    assert json.loads((two / "adapter_config.json").read_text())["r"] == 4
    theirs = load_file(two / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(load_file(one / "adapter_model.safetensors"))
    for key, value in load_file(one / "adapter_model.safetensors").items():
        torch.testing.assert_close(theirs[key], value, atol=1e-5, rtol=1e-4, msg=key)
    x = torch.tensor([[5, 80, 100, 7]])
    with torch.no_grad():
        adapted = LLM.load(runs / "base", adapter=two).model(x)
        base = LLM.load(runs / "base").model(x)
    assert (adapted - base).abs().max() > 0


def test_one_process_resumes_the_fsdp_run_and_says_the_layout_changed(runs, capsys):
    for where in ("parallel", "one"):
        assert main(["finetune", "--out", str(runs / where / "full_fsdp"), "--resume", "--max-steps", "8",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "layout changed: saved by fsdp over 2 processes, resumed on one process" in out
    one, two = step_losses(runs / "one" / "full_fsdp"), step_losses(runs / "parallel" / "full_fsdp")
    assert sorted(two) == list(range(1, 9))
    assert max(abs(one[s] - two[s]) for s in (7, 8)) < TOLERANCE


def test_modes_fine_tuning_cannot_use_are_one_line_errors(runs, tmp_path, capsys):
    base, data = runs / "base", runs / "train.jsonl"
    for flags, message in ((["--method", "lora", "--parallel", "fsdp"], "use --parallel dp"),
                           (["--method", "full", "--parallel", "pp"], "--parallel pp splits"),
                           (["--method", "full", "--parallel", "tp", "--tp", "2"], "world size 1 does not factor")):
        assert main(["finetune", str(base), "--data", str(data), "--out", str(tmp_path / "x"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


# ---- the worker torchrun starts ---------------------------------------------------------------------------------
def worker(root: Path, names: list[str]) -> None:
    from scratchlm.train.distributed import init_distributed, shutdown

    dist = init_distributed("cpu", timeout=300)  # joined once: every run below keeps the process group
    try:
        for name in names:
            code = main(finetune_args(root / "base", root / "train.jsonl", root / "parallel", name))
            if code != 0:
                raise SystemExit(f"rank {dist.rank}: finetune {name} exited with {code}")
    finally:
        shutdown(dist)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
