"""Errors meant for people.

Every failure a user can cause raises a subclass of :class:`ScratchLMError` whose message says what is
wrong and what to do. The CLI prints it as one line and exits with code 2; the server maps it to an
OpenAI-style error response.
"""


class ScratchLMError(Exception):
    """Base class of every error that scratchlm reports to a user."""


class UnknownModelError(ScratchLMError):
    """A model name that is neither known, nor pulled, nor a path."""


class ModelFileError(ScratchLMError):
    """A model, tokenizer or checkpoint file that is missing, truncated or corrupt."""


class UnsupportedError(ScratchLMError):
    """An architecture, tensor type or option that scratchlm does not handle."""


class ConfigError(ScratchLMError):
    """An invalid model configuration or option value."""


class ContextLengthError(ScratchLMError):
    """A prompt that does not fit in the model's context window."""


class SamplingError(ScratchLMError):
    """A sampling parameter outside its allowed range."""


class DownloadError(ScratchLMError):
    """`scratchlm pull` could not fetch or verify a model."""


class DataError(ScratchLMError):
    """Training data that is missing, empty, too short or not valid UTF-8/JSONL."""


class TrainingError(ScratchLMError):
    """Training that cannot go on: a non-finite loss, a failed checkpoint write, a mismatched resume."""
