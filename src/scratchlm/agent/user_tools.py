"""Tools from the user's own Python module: ``scratchlm agent ... --tools-module my_tools``.

    # my_tools.py
    def word_count(text: str) -> int:
        '''How many words a text has.'''
        return len(text.split())

The module is imported by name (from the current folder first) or from a ``.py`` file path. Its tools are the
functions listed in a ``TOOLS`` list if it has one, else every public function defined in the module itself (not
the ones it imports); each signature becomes a JSON schema (``scratchlm.function_schema``). Importing runs the
module's code: name only modules you trust, as with any ``import``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from scratchlm.errors import ConfigError


def import_module(spec: str):
    """The module named ``spec`` (searched from the current folder first), or the ``.py`` file at ``spec``."""
    path = Path(spec)
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"--tools-module {spec}: no such file")
        loader_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loader_spec)
        _execute(spec, lambda: loader_spec.loader.exec_module(module))
        return module
    sys.path.insert(0, str(Path.cwd()))
    try:
        return _execute(spec, lambda: importlib.import_module(spec))
    finally:
        sys.path.remove(str(Path.cwd()))


def _execute(spec: str, load):
    try:
        return load()
    except ModuleNotFoundError as exc:
        raise ConfigError(f"--tools-module {spec}: cannot import {exc.name!r}: give a module in the current folder "
                          "or a path to a .py file") from None
    except Exception as exc:  # the user's module raised while importing: say so in one line
        raise ConfigError(f"--tools-module {spec} failed while importing: {type(exc).__name__}: {exc}") from None


def tools_from_module(spec: str) -> list:
    """The tools of a module (its ``TOOLS`` list, or its public functions) as ``scratchlm.tools.Tool`` objects."""
    from scratchlm.tools import as_tools

    module = import_module(spec)
    if hasattr(module, "TOOLS"):
        chosen = list(module.TOOLS)
    else:
        chosen = [f for name, f in vars(module).items()
                  if inspect.isfunction(f) and not name.startswith("_") and f.__module__ == module.__name__]
    if not chosen:
        raise ConfigError(f"--tools-module {spec} defines no functions: write def my_tool(arg: str) -> str: ... "
                          "in it, or list them in TOOLS")
    return as_tools(chosen)
