"""Shared fixtures: the pulled SmolLM2 model (integration tests) and tiny random models (fast tests).

Tests that need SmolLM2 fail in CI (CI=true) when it is missing, and are skipped elsewhere: `make test`
pulls it first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from scratchlm.config import ModelConfig
from scratchlm.llm import LLM
from scratchlm.model import Transformer
from scratchlm.tokenizer import BYTE_TO_UNICODE, Tokenizer

# Unset, SCRATCHLM_COMPILE lets LLM.load compile int4 models' decode step in background processes (minutes of CPU
# each, scratchlm.aot_background); the suite keeps it off (its child processes inherit that) and compiles only where
# a test asks for it (compile=True, --compile, or setting SCRATCHLM_COMPILE itself: tests/test_compiled.py,
# tests/test_fast_default.py).
os.environ.setdefault("SCRATCHLM_COMPILE", "0")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def smollm2_gguf() -> Path:
    """Path of the pulled SmolLM2 GGUF; fails in CI and skips elsewhere when it is missing."""
    from scratchlm.hub import model_path

    path = Path(os.environ.get("SCRATCHLM_TEST_GGUF") or model_path("smollm2-135m-instruct"))
    if not path.is_file():
        message = f"SmolLM2 is not pulled ({path}): run `scratchlm pull smollm2-135m-instruct`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2(smollm2_path) -> LLM:
    """SmolLM2-135M-Instruct in float32 (dequantized from its Q4_1 file), loaded once per test session."""
    return LLM.load(smollm2_path, dtype="float32")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Directory of the pulled all-MiniLM-L6-v2 encoder; fails in CI and skips elsewhere when it is missing."""
    from scratchlm.hub import is_pulled, model_path

    if not is_pulled("all-minilm-l6-v2"):
        message = "all-MiniLM-L6-v2 is not pulled: run `scratchlm pull all-minilm-l6-v2`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return model_path("all-minilm-l6-v2")


def byte_tokenizer() -> Tokenizer:
    """A tokenizer with the 256 byte tokens, no merges, and ChatML special tokens (ids 256-258)."""
    vocab = {BYTE_TO_UNICODE[b]: b for b in range(256)}
    specials = {tok: 256 + i for i, tok in enumerate(SPECIALS)}
    return Tokenizer(vocab, [], specials, pretokenizer="gpt2", bos_token=None, eos_token="<|im_end|>")


def tiny_config(kind: str = "llama", **changes) -> ModelConfig:
    base = ModelConfig(vocab_size=260, context_length=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       d_ff=160, positions="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False,
                       rope_theta=10000.0, name="tiny-llama")
    if kind == "gpt2":
        base = ModelConfig(vocab_size=260, context_length=128, d_model=64, n_layers=2, n_heads=4,
                           positions="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True,
                           name="tiny-gpt2")
    return base.replace(**changes)


def tiny_llm(kind: str = "llama", seed: int = 0, **changes) -> LLM:
    """A random tiny model with the byte tokenizer: fast, deterministic, no files needed."""
    torch.manual_seed(seed)
    config = tiny_config(kind, **changes)
    model = Transformer(config).eval()
    return LLM(model, byte_tokenizer(), name=config.name)


@pytest.fixture
def tiny() -> LLM:
    return tiny_llm("llama")


@pytest.fixture
def one_thread():
    """One torch thread for the test. Tiny problems gain nothing from a second thread, and on a busy machine
    every parallel kernel call can wait a scheduler slice for it (measured: 24 ms per int8 call at load 10).
    Modules of tiny-model tests use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
