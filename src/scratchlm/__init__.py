"""scratchlm: a complete large-language-model stack, written from scratch in readable PyTorch."""

from scratchlm.config import ModelConfig
from scratchlm.errors import ScratchLMError

__all__ = ["LLM", "ModelConfig", "SamplingParams", "ScratchLMError"]
__version__ = "0.1.0"

# LLM and SamplingParams import torch, so they load on first use (PEP 562): the `scratchlm` command must set
# OpenMP's environment before torch loads (see scratchlm/cpu.py), and `scratchlm --help` stays quick.
_LAZY = {"LLM": "scratchlm.llm", "SamplingParams": "scratchlm.sampling"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scratchlm' has no attribute {name!r}")
