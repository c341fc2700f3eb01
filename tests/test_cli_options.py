"""Options and behaviours shared by every ``scratchlm`` command: engine options declared once, CPU defaults set
before torch loads, outputs that are never silently replaced, progress on stderr, and the small messages."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_llm
from scratchlm import cli
from scratchlm.chat_session import ChatSession
from scratchlm.formats.checkpoint import save_model_dir

SRC = Path(cli.__file__).parent
ENGINE_COMMANDS = [["generate", "m", "p"], ["chat", "m"], ["serve", "m"], ["eval", "perplexity", "m", "f"],
                   ["eval", "task", "m", "f"], ["eval", "harness", "m", "--tasks", "t"],
                   ["quantize", "m", "--to", "int4", "--out", "o"]]


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_engine_options_are_declared_once():
    declared = {}
    for path in SRC.rglob("*.py"):
        for flag in ("--group-size", "--quantize", "--compile", "--threads"):
            if re.search(rf"add_argument\(\s*\"{flag}\"", path.read_text(encoding="utf-8")):
                declared.setdefault(flag, []).append(path.relative_to(SRC).as_posix())
    assert declared["--group-size"] == ["cli_options.py"]
    assert declared["--quantize"] == ["cli_options.py"]
    # --threads: the shared one, and the global `scratchlm --threads N COMMAND`; train has its own --compile.
    assert sorted(declared["--threads"]) == ["cli.py", "cli_options.py"]
    assert sorted(declared["--compile"]) == ["cli_options.py", "train/cli.py"]


@pytest.mark.parametrize("argv", ENGINE_COMMANDS, ids=lambda a: " ".join(a[:2]) if a[0] == "eval" else a[0])
def test_every_engine_command_takes_the_same_options_with_the_real_default(argv):
    from scratchlm.quant.quantize import DEFAULT_GROUP_SIZE

    args = parse(*argv, "--group-size", "64", "--threads", "1")
    assert (args.group_size, args.threads) == (64, 1)
    assert parse(*argv).group_size is None  # None means quant's default, which the help names:
    from scratchlm.cli_options import DEFAULT_GROUP_SIZE as ADVERTISED

    assert ADVERTISED == DEFAULT_GROUP_SIZE
    if argv[0] != "quantize":
        args = parse(*argv, "--dtype", "bfloat16", "--quantize", "int4")
        assert (args.dtype, args.quantize) == ("bfloat16", "int4")


def test_compile_defaults_to_the_models_choice_and_no_compile_is_its_negation():
    assert parse("generate", "m", "p").compile is None  # None: LLM.load's default (int4: compiled)
    assert parse("generate", "m", "p", "--compile").compile is True
    assert parse("chat", "m", "--compile", "--no-compile").compile is False
    assert parse("serve", "m", "--no-compile").compile is False
    assert parse("generate", "m", "p").dtype is None  # None: a quantized GGUF stays quantized


def test_threads_before_or_after_the_command():
    assert parse("--threads", "3", "generate", "m", "p").threads == 3
    assert parse("generate", "m", "p", "--threads", "2").threads == 2
    assert parse("generate", "m", "p").threads is None


def run_python(code: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


CHECK = """
import os, sys
import scratchlm.cli as cli
assert "torch" not in sys.modules, "importing the CLI loaded torch"
cli.main(sys.argv[1:] or ["list"])
import torch
print(os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads())
"""


def test_the_cli_sets_a_short_spin_and_free_threads_before_torch_loads():
    spin, env_threads, torch_threads = run_python(CHECK).splitlines()[-1].split()
    assert spin == "1000"
    usable = len(os.sched_getaffinity(0))
    assert 1 <= int(env_threads) <= usable and torch_threads == env_threads


def test_the_users_own_settings_win():
    out = run_python(CHECK, OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1").splitlines()[-1]
    assert out.split() == ["None", "1", "1"]  # the user chose a wait policy: no spin count of ours added
    out = run_python(CHECK, GOMP_SPINCOUNT="5", OMP_NUM_THREADS="1").splitlines()[-1]
    assert out.split() == ["5", "1", "1"]
    out = run_python(CHECK.replace('["list"]', '["--threads", "1", "list"]')).splitlines()[-1]
    assert out.split()[1:] == ["1", "1"]


def test_choose_threads_rules():
    from scratchlm import cpu

    assert cpu.choose_threads(3, environ={}) == 3
    assert cpu.choose_threads(None, environ={"OMP_NUM_THREADS": "2"}) is None
    assert 1 <= cpu.choose_threads(None, environ={}) <= cpu.usable_cpus()
    env = {}
    assert cpu.set_wait_policy(env) and env == {"GOMP_SPINCOUNT": "1000"}
    assert not cpu.set_wait_policy({"OMP_WAIT_POLICY": "ACTIVE"})


# ---- outputs are never silently replaced ------------------------------------------------------------
def test_tokenizer_train_refuses_to_replace_its_output_without_force(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("to be or not to be, that is the question " * 20, encoding="utf-8")
    argv = ["tokenizer", "train", str(tmp_path / "a.txt"), "--vocab-size", "300", "--out", str(tmp_path / "tok")]
    assert cli.main(argv) == 0
    assert str(tmp_path / "tok" / "tokenizer.json") in capsys.readouterr().out
    first = (tmp_path / "tok" / "tokenizer.json").read_bytes()
    assert cli.main([*argv[:3], "--vocab-size", "280", *argv[5:]]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == first
    assert cli.main([*argv[:3], "--vocab-size", "280", *argv[5:], "--force"]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "tok"]  # no temporary folders left


def test_tokenizer_train_never_replaces_a_folder_that_is_not_its_output(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text to train on " * 20, encoding="utf-8")
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "diary.txt").write_text("private", encoding="utf-8")
    assert cli.main(["tokenizer", "train", str(tmp_path / "a.txt"), "--vocab-size", "270", "--out", str(mine),
                     "--force"]) == 2
    assert "refusing" in capsys.readouterr().err and (mine / "diary.txt").read_text() == "private"


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    llm = tiny_llm()
    return save_model_dir(tmp_path / "tiny", llm.config, llm.model.canonical_state_dict(), llm.tokenizer)


def test_quantize_refuses_to_replace_without_force_and_replaces_with_it(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli.main(["quantize", str(tiny_dir), "--to", "int8", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert cli.main(["quantize", str(tiny_dir), "--to", "int4", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert '"int8"' in (out / "quantization.json").read_text()
    assert cli.main(["quantize", str(tiny_dir), "--to", "int4", "--out", str(out), "--force"]) == 0
    assert '"int4"' in (out / "quantization.json").read_text()


def test_quantize_progress_counts_the_layers_on_stderr(capsys):
    from scratchlm.quant import quantize_model

    llm = tiny_llm()
    layers = sum(isinstance(m, __import__("torch").nn.Linear) for m in llm.model.modules())
    quantize_model(llm.model, "int8", progress=True)
    err = capsys.readouterr().err
    assert "quantizing to int8" in err and f"{layers}/{layers}" in err


def test_progress_is_off_when_stderr_is_not_a_terminal_or_with_no_progress():
    from scratchlm.cli_options import show_progress

    args = parse("quantize", "m", "--to", "int8", "--out", "o")
    assert show_progress(args) is False  # pytest's stderr is not a terminal
    assert parse("quantize", "m", "--to", "int8", "--out", "o", "--no-progress").no_progress


# ---- small messages ----------------------------------------------------------------------------------
def test_pull_of_a_pulled_model_says_where_it_is_and_how_to_download_again(tmp_path, monkeypatch, capsys):
    from scratchlm.hub import KNOWN_MODELS, model_path

    monkeypatch.setenv("SCRATCHLM_HOME", str(tmp_path))
    name = "smollm2-135m-instruct"
    path = model_path(name)
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        f.truncate(KNOWN_MODELS[name].size)  # sparse: the size is what `pull` checks before skipping
    assert cli.main(["pull", name]) == 0
    out = capsys.readouterr().out
    assert "already pulled" in out and str(path) in out and f"scratchlm pull {name} --force" in out


def test_chat_help_lists_the_commands():
    out = io.StringIO()
    ChatSession(tiny_llm(), sampling=dict(max_new_tokens=2)).run(io.StringIO("/help\n/nope\n/exit\n"), out)
    text = out.getvalue()
    for command in ("/help", "/reset", "/system", "/exit"):
        assert command in text
    assert "unknown command /nope" in text


def test_convert_reports_each_step_with_its_duration_on_stderr(tiny_dir, tmp_path, capsys):
    from scratchlm.convert import convert

    convert(tiny_dir, "hf", tmp_path / "hf", progress=True)
    out, err = capsys.readouterr()
    assert out == ""  # stdout stays clean for pipes
    assert re.search(rf"loading {re.escape(str(tiny_dir))} \.\.\. \d+\.\d s", err)
    assert re.search(r"writing hf to .* \.\.\. \d+\.\d s", err)
    convert(tiny_dir, "hf", tmp_path / "hf2")
    assert capsys.readouterr().err == ""  # progress=False: silent


def test_evaluations_score_the_dense_model_unless_told_otherwise():
    for argv in [a for a in ENGINE_COMMANDS if a[0] == "eval"]:
        assert parse(*argv).dtype == "float32"
        assert parse(*argv, "--dtype", "bfloat16").dtype == "bfloat16"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs and affinity control")
def test_busy_cpus_counts_only_the_cpus_this_process_may_use():
    """A spinning process pinned to one CPU makes that CPU busy for a process pinned beside it, not for one pinned to
    another CPU (a container on a busy host is not busy itself)."""
    first, second = sorted(os.sched_getaffinity(0))[:2]
    spin = f"import os\nos.sched_setaffinity(0, {{{first}}})\nwhile True:\n    pass"
    spinner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)
        measure = ("import os, sys; os.sched_setaffinity(0, {%d}); from scratchlm import cpu; "
                   "print(cpu.busy_cpus(0.5))")
        on_the_busy_cpu = float(run_python(measure % first).split()[-1])
        on_the_free_cpu = float(run_python(measure % second).split()[-1])
    finally:
        spinner.kill()
        spinner.wait()
    assert on_the_busy_cpu > 0.6 and on_the_free_cpu < 0.5
