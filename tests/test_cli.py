"""The `scratchlm` command: what a person sees, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_llm
from scratchlm import cli
from scratchlm.chat_session import ChatSession
from scratchlm.formats.checkpoint import save_model_dir


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    llm = tiny_llm()
    return save_model_dir(tmp_path / "tiny", llm.config, llm.model.canonical_state_dict(), llm.tokenizer)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_model_lists_the_known_ones(capsys):
    code, _, err = run(capsys, "generate", "gpt-17", "hi")
    assert_one_line_error(code, err, "unknown model 'gpt-17'", "smollm2-135m-instruct")


def test_missing_file_is_named(capsys, tmp_path):
    code, _, err = run(capsys, "info", str(tmp_path / "nothere.gguf"))
    assert_one_line_error(code, err, "nothere.gguf")


def test_truncated_gguf_is_named(capsys, tmp_path, smollm2_path):
    bad = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        bad.write_bytes(f.read(5_000_000))
    code, _, err = run(capsys, "generate", str(bad), "hi")
    assert_one_line_error(code, err, "cut.gguf")


def test_prompt_longer_than_context_gives_both_lengths(capsys, tiny_dir):
    code, _, err = run(capsys, "generate", str(tiny_dir), "z" * 300)
    assert_one_line_error(code, err, "300 tokens", "128 tokens")


@pytest.mark.parametrize("flag,value,allowed", [("--temperature", "-1", "between 0 and 100"),
                                                ("--top-p", "1.5", "in (0, 1]"), ("--top-k", "-1", ">= 1")])
def test_invalid_sampling_value_names_the_range(capsys, tiny_dir, flag, value, allowed):
    code, _, err = run(capsys, "generate", str(tiny_dir), "hi", flag, value)
    assert_one_line_error(code, err, allowed)


def test_sampling_flags_default_to_the_library_and_zero_turns_a_filter_off(capsys, tiny_dir):
    from scratchlm.sampling import DEFAULT_SAMPLING

    args = cli.build_parser().parse_args(["generate", "m", "p"])
    assert cli.sampling_kwargs(args) == {}  # nothing given: LLM's defaults apply
    args = cli.build_parser().parse_args(["generate", "m", "p", "--top-k", "0", "--min-p", "0", "--seed", "3"])
    assert cli.sampling_kwargs(args) == {"top_k": None, "min_p": 0.0, "seed": 3}
    code, out, _ = run(capsys, "generate", str(tiny_dir), "hello", "--seed", "5", "--max-new-tokens", "12")
    assert code == 0 and DEFAULT_SAMPLING["top_k"] is not None
    assert out == tiny_llm().generate("hello", seed=5, max_new_tokens=12) + "\n"


def test_generate_streams_the_same_text_as_the_api(capsys, tiny_dir):
    code, out, _ = run(capsys, "generate", str(tiny_dir), "hello", "--temperature", "0", "--max-new-tokens", "12")
    assert code == 0
    expected = tiny_llm().generate("hello", temperature=0, max_new_tokens=12)
    assert out == expected + "\n"


def test_info_reports_architecture_and_size(capsys, tiny_dir):
    code, out, _ = run(capsys, "info", str(tiny_dir))
    assert code == 0
    fields = dict(line.split(None, 1) if " " in line else (line, "") for line in out.splitlines())
    assert "llama-style" in out and "grouped-query attention 4/2" in out
    assert "context length   128" in out and fields["layers"].strip() == "2"


def test_list_shows_known_models(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_HOME", str(tmp_path))
    code, out, _ = run(capsys, "list")
    assert code == 0 and "smollm2-135m-instruct" in out and " no " in out and str(tmp_path) in out


def test_pull_unknown_name_fails_cleanly(capsys):
    code, _, err = run(capsys, "pull", "llama-9000")
    assert_one_line_error(code, err, "unknown model 'llama-9000'")


def test_chat_session_keeps_history_and_obeys_commands():
    llm = tiny_llm()
    session = ChatSession(llm, sampling=dict(temperature=0, max_new_tokens=5))
    out = io.StringIO()
    session.run(io.StringIO("hi\n/system be nice\nhello\nagain\n/reset\n/exit\nignored\n"), out)
    text = out.getvalue()
    assert "(system prompt set; conversation reset)" in text and "(conversation reset)" in text
    assert session.history == [] and session.system == "be nice"
    # The reply to "hello" came from a conversation holding the system prompt and only that turn.
    expected = llm.chat([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello"}],
                        temperature=0, max_new_tokens=5)
    assert expected + "\n" in text


def test_chat_history_is_trimmed_to_fit_the_context():
    llm = tiny_llm()
    session = ChatSession(llm, sampling=dict(temperature=0, max_new_tokens=20))
    for i in range(6):
        session.history += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer"}]
    session.history.append({"role": "user", "content": "last question"})
    assert len(llm.encode_chat(session.messages())) + 20 > llm.config.context_length
    dropped = session.fit_history()
    assert dropped > 0
    assert len(llm.encode_chat(session.messages())) + 20 <= llm.config.context_length
    assert session.history[0]["role"] == "user" and session.history[-1]["content"] == "last question"


def test_console_script_pipes_a_chat_and_exits_2_on_errors(tiny_dir):
    exe = Path(sys.executable).with_name("scratchlm")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([str(exe), "chat", str(tiny_dir), "--temperature", "0", "--max-new-tokens", "4"],
                          input="hello\n", capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip()
    bad = subprocess.run([str(exe), "chat", "no-such-model"], input="", capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "unknown model" in bad.stderr
