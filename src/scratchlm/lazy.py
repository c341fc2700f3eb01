"""Names of a package that load their submodule on first use (PEP 562's module ``__getattr__``).

The ``scratchlm`` command imports each package's ``cli.py`` to build its parser; if the package's ``__init__``
imported its modules eagerly, ``scratchlm --help`` would import torch (~2 s). So a package lists its public names
and the submodule that defines each, and lets this function fetch them when first asked for:

    _EXPORTS = {"CLIP": "clip", "clip_loss": "clip"}
    __all__ = sorted(_EXPORTS)
    __getattr__ = lazy_exports(__name__, _EXPORTS)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps each name to the submodule that defines it."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return __getattr__
