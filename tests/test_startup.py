"""Start-up: building the ``scratchlm`` parser imports neither torch nor numpy (about 2.4 s of CPU per command
otherwise, ``--help`` included), and the faster load paths give exactly what the plain ones gave."""

from __future__ import annotations

import subprocess
import sys

from scratchlm import cli_options, sampling

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
