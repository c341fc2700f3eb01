"""scratchlm: a complete large-language-model stack, written from scratch in readable PyTorch."""

from scratchlm.config import ModelConfig
from scratchlm.errors import ScratchLMError
from scratchlm.llm import LLM
from scratchlm.sampling import SamplingParams

__all__ = ["LLM", "ModelConfig", "SamplingParams", "ScratchLMError"]
__version__ = "0.1.0"
