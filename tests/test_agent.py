"""The agent (scratchlm.agent): the safe calculator, the confined file reader, user tool modules, the ReAct loop on a
tiny random model, and the CLI's one-line errors (SmolLM2's runs are in tests/test_agent_smollm2.py)."""

from __future__ import annotations

import operator
import re
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_llm
from scratchlm.agent import Agent, FileReader, calculate, calculator, format_step, step_schema, tools_from_module
from scratchlm.cli import main
from scratchlm.errors import ConfigError, SamplingError
from scratchlm.function_schema import ToolError
from scratchlm.structured import json_schema_constraint

pytestmark = pytest.mark.usefixtures("one_thread")

# --- calculator: against Python's own arithmetic on generated expressions ------------------------------------
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "//": operator.floordiv,
       "%": operator.mod}
numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))


@st.composite
def expressions(draw, depth: int = 0):
    """(text, value) of a random expression; value is what Python's operators give (or ZeroDivisionError)."""
    if depth >= 3 or draw(st.booleans()):
        x = draw(numbers)
        text = repr(x)
        return (f"({text})" if x < 0 else text), x
    kind = draw(st.sampled_from(["binary", "binary", "neg", "power"]))
    left_text, left = draw(expressions(depth + 1))
    if kind == "neg":
        return f"-({left_text})", (-left if not isinstance(left, Exception) else left)
    if kind == "power":  # small exponents: the calculator refuses enormous powers on purpose
        exponent = draw(st.integers(0, 4))
        value = left if isinstance(left, Exception) else _apply(operator.pow, left, exponent)
        return f"({left_text}) ** {exponent}", value
    op = draw(st.sampled_from(sorted(OPS)))
    right_text, right = draw(expressions(depth + 1))
    first_error = next((v for v in (left, right) if isinstance(v, Exception)), None)
    return f"({left_text}) {op} ({right_text})", first_error or _apply(OPS[op], left, right)


def _apply(fn, *args):
    try:
        return fn(*args)
    except (ZeroDivisionError, OverflowError) as exc:
        return exc


@settings(max_examples=100, deadline=None)
@given(expressions())
def test_calculator_matches_python_arithmetic(case):
    text, expected = case
    if isinstance(expected, Exception):
        with pytest.raises(ToolError):
            calculate(text)
        return
    got = calculate(text)
    assert type(got) is type(expected)
    assert got == expected or (got != got and expected != expected)  # equal, or both NaN (inf - inf)
    assert calculator(text) == (repr(expected) if isinstance(expected, float) else str(expected))


@pytest.mark.parametrize("text, says", [
    ("__import__('os').system('echo hi')", "not arithmetic"),
    ("open('/etc/passwd')", "calling 'open'"),
    ("(1).__class__", "Attribute"),
    ("x + 1", "the name 'x'"),
    ("[1, 2]", "List"),
    ("'a' * 3", "not a number"),
    ("True + 1", "not a number"),
    ("lambda: 1", "Lambda"),
    ("2 ^ 3", "write powers as **"),
    ("9 ** 9 ** 9", "too large"),
    ("1 / 0", "division by zero"),
    ("sqrt(-1)", "cannot compute"),
    ("1 +", "not an arithmetic expression"),
    ("", "needs an arithmetic expression"),
    ("1" * 600, "at most 500"),
    ("-" * 400 + "1", "nested too deeply"),
])
def test_calculator_refuses_everything_but_arithmetic(text, says):
    with pytest.raises(ToolError, match=re.escape(says)):
        calculate(text)


def test_calculator_functions():
    assert calculate("abs(-3) + round(2.567, 2) + max(1, 4) + min(2, 5)") == 3 + 2.57 + 4 + 2
    assert calculator("sqrt(16)") == "4.0" and calculator("7 // 2") == "3"


# --- the file reader: confinement ------------------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "notes"
    (root / "sub").mkdir(parents=True)
    (root / "meeting.txt").write_text("Room 204 on Friday.", encoding="utf-8")
    (root / "sub" / "deep.md").write_text("# deep\nhello", encoding="utf-8")
    (tmp_path / "secret.txt").write_text("the password", encoding="utf-8")
    (root / "out_link.txt").symlink_to(tmp_path / "secret.txt")
    (root / "out_dir").symlink_to(tmp_path)
    (root / "in_link.txt").symlink_to(root / "meeting.txt")
    (root / "binary.bin").write_bytes(b"\xff\xfe\x00 not text")
    return root


def test_file_reader_reads_inside_the_folder(folder):
    reader = FileReader(folder)
    assert reader.read("meeting.txt") == "Room 204 on Friday."
    assert reader.read("sub/deep.md") == "# deep\nhello"
    assert reader.read("in_link.txt") == "Room 204 on Friday."  # a link that stays inside
    assert reader.files() == ["binary.bin", "in_link.txt", "meeting.txt", "sub/deep.md"]
    short = FileReader(folder, max_chars=4).read("meeting.txt")
    assert short.startswith("Room\n[... cut: the file has 19 bytes]")


@pytest.mark.parametrize("path, says", [
    ("../secret.txt", "contains '..'"),
    ("sub/../../secret.txt", "contains '..'"),
    ("sub/../meeting.txt", "contains '..'"),  # refused by spelling, even when it would stay inside
    ("/etc/passwd", "absolute path"),
    ("~/secret.txt", "absolute path"),
    ("out_link.txt", "leads outside"),
    ("out_dir/secret.txt", "leads outside"),
    ("missing.txt", "no file"),
    ("sub", "not a regular file"),
    ("binary.bin", "not UTF-8"),
    ("", "relative to the folder"),
    ("a\0b", "relative to the folder"),
])
def test_file_reader_refuses_paths_out_of_the_folder(folder, path, says):
    with pytest.raises(ToolError, match=says):
        FileReader(folder).read(path)


def test_file_reader_tool_names_the_files(folder):
    tool = FileReader(folder).tool()
    assert tool.name == "read_file" and tool.schema["properties"]["path"]["enum"] == FileReader(folder).files()
    assert tool({"path": "meeting.txt"}) == "Room 204 on Friday."
    with pytest.raises(ConfigError, match="not a folder"):
        FileReader(folder / "meeting.txt")


# --- user tools from a module ------------------------------------------------------------------------------------
MODULE = '''
from os.path import join  # imported, so not a tool

def word_count(text: str) -> int:
    """How many words a text has."""
    return len(text.split())

def shout(text: str, times: int = 1) -> str:
    """The text in capitals.

    Args:
        times: how many times to repeat it
    """
    return " ".join([text.upper()] * times)

def _helper():
    pass
'''


def test_tools_from_a_module_file_and_by_name(tmp_path, monkeypatch):
    (tmp_path / "my_tools.py").write_text(MODULE, encoding="utf-8")
    by_file = tools_from_module(str(tmp_path / "my_tools.py"))
    assert [t.name for t in by_file] == ["word_count", "shout"]
    shout = by_file[1]
    assert shout.schema == {"type": "object", "properties": {
        "text": {"type": "string"}, "times": {"type": "integer", "description": "how many times to repeat it",
                                              "default": 1}}, "required": ["text"], "additionalProperties": False}
    assert shout({"text": "hi", "times": 2}) == "HI HI"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "listed.py").write_text(MODULE + "\nTOOLS = [shout]\n", encoding="utf-8")
    assert [t.name for t in tools_from_module("listed")] == ["shout"]


@pytest.mark.parametrize("source, says", [
    (None, "cannot import"),
    ("raise RuntimeError('boom')", "failed while importing: RuntimeError: boom"),
    ("X = 1", "defines no functions"),
    ("def bad(*args): pass", r"\*args cannot be described"),
])
def test_tools_module_errors(tmp_path, monkeypatch, source, says):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "broken_tools", raising=False)  # imported by an earlier case
    if source is not None:
        (tmp_path / "broken_tools.py").write_text(source, encoding="utf-8")
    with pytest.raises(ConfigError, match=says):
        tools_from_module("broken_tools")


# --- the loop on a tiny random model ----------------------------------------------------------------------------
def test_step_schema_puts_the_thought_first_and_can_force_an_answer():
    tool_names = []

    def note(text: str) -> str:
        """Remember a note."""
        tool_names.append(text)
        return "ok"

    from scratchlm.tools import as_tools

    tools = as_tools([calculator, note])
    free = json_schema_constraint(step_schema(tools))
    assert free.matches('{"thought":"a","tool_call":{"name":"calculator","arguments":{"expression":"1+1"}}}')
    assert free.matches('{"thought":"b","response":"2"}')
    assert not free.matches('{"tool_call":{"name":"calculator","arguments":{"expression":"1+1"}}}')  # no thought
    assert not free.matches('{"thought":"a","tool_call":{"name":"calc","arguments":{"expression":"1"}}}')
    assert not free.matches('{"thought":"a","tool_call":{"name":"note","arguments":{"txt":"x"}}}')
    forced = json_schema_constraint(step_schema(tools, must_answer=True))
    assert forced.matches('{"thought":"b","response":"2"}')
    assert not forced.matches('{"thought":"a","tool_call":{"name":"calculator","arguments":{"expression":"1"}}}')


def test_agent_stops_when_a_reply_outgrows_its_token_budget():
    llm = tiny_llm(context_length=2048)
    result = Agent(llm, [calculator], max_steps=3, max_new_tokens=14, temperature=1.0, seed=0).run("1 + 1?")
    assert result.stop_reason == "length" and not result.finished and result.answer is None
    assert len(result.steps) == 1 and result.steps[0].reply.startswith('{"thought":"')
    assert "reply cut at the token budget" in format_step(result.steps[0])


def test_agent_refuses_bad_setup():
    llm = tiny_llm()
    with pytest.raises(ConfigError, match="max_steps"):
        Agent(llm, [calculator], max_steps=0)
    with pytest.raises(ConfigError, match="no Python function"):
        Agent(llm, [{"type": "function", "function": {"name": "ghost"}}])
    with pytest.raises(ConfigError, match="non-empty"):
        Agent(llm, [calculator]).run("  ")
    with pytest.raises(SamplingError, match="temperature"):
        Agent(llm, [calculator], temperature=-1)


# --- CLI errors: one line, exit code 2, before the model loads ----------------------------------------------------
@pytest.mark.parametrize("extra, says", [
    (["--tools", "calculator,web"], "unknown tool 'web'"),
    (["--tools", "read_file"], "read_file tool needs --root"),
    (["--tools", "search"], "search tool needs --store"),
    (["--root", "/no/such/folder"], "is not a folder"),
    (["--store", "/no/such/store.db"], "no document store"),
    (["--tools-module", "no_such_tools_module"], "cannot import"),
    (["--tools", "none"], "no tools"),
    (["--max-steps", "0"], "--max-steps must be at least 1"),
])
def test_agent_cli_errors(capsys, extra, says):
    assert main(["agent", "no-such-model", "What is 2 + 2?", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err and err.startswith("error:")


def test_agent_cli_empty_task(capsys):
    assert main(["agent", "no-such-model", " "]) == 2
    assert "give the agent a task" in capsys.readouterr().err
