"""``LLM``: a model, its tokenizer and its chat template, loaded from any supported source.

    llm = LLM.load("smollm2-135m-instruct")     # a known name, a .gguf file, an HF or scratchlm directory
    llm.generate("Once upon a time", max_new_tokens=40)
    llm.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0)
    for chunk in llm.stream("The sea is", max_new_tokens=20): print(chunk, end="")

Every file format is converted to the canonical representation at load time (``scratchlm.formats``);
nothing after this point knows where the model came from.
"""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from scratchlm.chat import ChatTemplate
from scratchlm.config import ModelConfig
from scratchlm.errors import ConfigError, ModelFileError, UnsupportedError
from scratchlm.files import read_json
from scratchlm.generate import Completion, ContextShift, Sequence, stream_sequences
from scratchlm.model import Transformer, build_model
from scratchlm.sampling import SamplingParams, with_defaults
from scratchlm.tokenizer import Tokenizer

STRUCTURED_KEYWORDS = ("grammar", "json_schema", "regex", "response_format")
# How to decode rather than what to sample (docs/decoding.md): speculative decoding and context shift.
DECODING_KEYWORDS = ("draft", "draft_tokens", "context_shift", "keep", "stats")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} dicts."""
    return value.get("content") if isinstance(value, dict) else value


TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")  # files torch.save wrote (read weights-only)


def _read_weights(path: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, canonical state dict) of a scratchlm, HF, litgpt or nanoGPT directory, or a checkpoint file."""
    from scratchlm.formats import checkpoint, hf, torch_files

    if path.is_file() and path.name.startswith("pytorch_model") and (path.parent / "config.json").is_file():
        path = path.parent  # HF weights: the directory holds the config and the other shards
    if path.is_file():
        if path.name == torch_files.LITGPT_WEIGHTS or torch_files.is_litgpt_dir(path.parent):
            if not torch_files.is_litgpt_dir(path.parent):
                raise ModelFileError(f"{path.parent / torch_files.LITGPT_CONFIG} is missing: litgpt checkpoints "
                                     "need their model_config.yaml beside lit_model.pth")
            return torch_files.load_litgpt_dir(path.parent, dtype)
        return torch_files.load_nanogpt(path, dtype)
    if checkpoint.is_model_dir(path):
        return checkpoint.load_model_dir(path, dtype)
    if (path / "config.json").is_file():
        config, state, _ = hf.load_hf(path, dtype)
        return config, state
    if torch_files.is_litgpt_dir(path):
        return torch_files.load_litgpt_dir(path, dtype)
    if (path / torch_files.NANOGPT_FILE).is_file():
        return torch_files.load_nanogpt(path / torch_files.NANOGPT_FILE, dtype)
    raise ModelFileError(f"{path} holds none of config.json (HF), {checkpoint.CONFIG_FILE} (scratchlm), "
                         f"{torch_files.LITGPT_WEIGHTS} + {torch_files.LITGPT_CONFIG} (litgpt) "
                         f"or {torch_files.NANOGPT_FILE} (nanoGPT)")


def _sentencepiece_file(directory: Path) -> Path | None:
    """A SentencePiece model beside the weights (T5's spiece.model, tokenizer.model), used when there is no
    tokenizer.json."""
    if (directory / "tokenizer.json").is_file():
        return None
    for name in ("tokenizer.model", "spiece.model"):
        if (directory / name).is_file():
            return directory / name
    return None


def _tokenizer_from_file(tok_file: Path) -> Tokenizer:
    """A byte-level BPE ``Tokenizer``, or a ``Unigram`` for a SentencePiece .model or a Unigram tokenizer.json
    (it offers the same interface)."""
    from scratchlm.unigram import Unigram, is_unigram_tokenizer_json

    if tok_file.suffix == ".model":
        return Unigram.from_sentencepiece(tok_file)  # type: ignore[return-value]
    try:
        return Tokenizer.from_file(tok_file)
    except UnsupportedError:
        if is_unigram_tokenizer_json(tok_file):
            return Unigram.from_tokenizer_json(tok_file)  # type: ignore[return-value]
        raise


def _read_tokenizer(directory: Path, override: Path | None,
                    weights: Path) -> tuple[Tokenizer, ChatTemplate, set[int]]:
    """Tokenizer, chat template and end-of-sequence ids from ``directory`` (the tokenizer from ``override``)."""
    model_dir = directory
    if override is not None:
        tok_file = _sentencepiece_file(override) or override / "tokenizer.json" if override.is_dir() else override
        if not tok_file.is_file():
            raise ModelFileError(f"tokenizer file not found: {tok_file}")
        directory = tok_file.parent
    else:
        tok_file = directory / "tokenizer.json"
        if not tok_file.is_file():
            tok_file = _sentencepiece_file(directory) or tok_file
        if not tok_file.is_file():
            hint = ""
            if weights.suffix in TORCH_SUFFIXES or (directory / "ckpt.pt").is_file():
                hint = (" (nanoGPT keeps no tokenizer file: put the tokenizer.json of the tokenizer it was trained "
                        "with, e.g. GPT-2's, beside the checkpoint or pass --tokenizer / tokenizer=; its char-level "
                        "meta.pkl is a pickle and is not read)")
            raise ModelFileError(f"missing tokenizer file: {tok_file}{hint}")
    tokenizer = _tokenizer_from_file(tok_file)
    tok_config = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() \
        else {}
    for attr in ("bos_token", "eos_token"):
        text = _token_text(tok_config.get(attr))
        if text is not None and tokenizer.token_to_id(text) is not None:
            setattr(tokenizer, attr, text)
            setattr(tokenizer, attr.replace("_token", "_id"), tokenizer.token_to_id(text))
    source = tok_config.get("chat_template")
    if source is None and (directory / "chat_template.jinja").is_file():
        source = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    eos_ids: set[int] = set()
    if (model_dir / "generation_config.json").is_file():
        eos = read_json(model_dir / "generation_config.json").get("eos_token_id")
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return tokenizer, ChatTemplate(source, tokenizer.bos_token, tokenizer.eos_token), eos_ids


def _collector_paused(load):
    """``load`` run with Python's cyclic garbage collector paused, then resumed as it was: a load makes ~100,000
    long-lived objects (a vocabulary, its merges, the modules) and next to no garbage, and the collector's passes
    over them were 0.12 s of CPU of SmolLM2's load (measured with gc.callbacks)."""

    @functools.wraps(load)
    def paused(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return load(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return paused


class LLM:
    """A ready-to-use language model: ``model`` (a torch Module), ``tokenizer`` and ``template``."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, template: ChatTemplate | None = None,
                 name: str = "model", source: Path | None = None, eos_ids: set[int] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template or ChatTemplate(None, tokenizer.bos_token, tokenizer.eos_token)
        self.name = name
        self.source = source
        self.eos_ids = set(eos_ids or ()) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    # ----------------------------------------------------------------------------------------------
    @classmethod
    @_collector_paused
    def load(cls, name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str = "cpu",
             quantize: str | None = None, group_size: int | None = None,
             adapter: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
             dequantize: bool = False, compile: bool | None = None) -> LLM:
        """Load a known model name (pulled), a GGUF file, a model directory or a PyTorch checkpoint file.

        Directories: HF (``config.json`` with safetensors or ``pytorch_model.bin``), scratchlm, quantized,
        litgpt (``lit_model.pth`` + ``model_config.yaml``), nanoGPT (``ckpt.pt``); files: ``.gguf``, nanoGPT
        ``ckpt.pt``, litgpt ``lit_model.pth``. Pickled files are read with the weights-only unpickler.
        ``quantize="int8"|"int4"`` quantizes the weights after loading (``group_size`` 32, 64 or 128 for
        int4, default 32); a directory written by ``scratchlm quantize`` loads quantized as it is.
        ``adapter`` is a LoRA adapter directory (PEFT format) merged into the weights before quantizing.
        ``tokenizer`` is a ``tokenizer.json`` (or a directory holding one) to use instead of the one beside
        the weights: nanoGPT checkpoints come without one.

        A block-quantized GGUF file (Q4_0/Q4_1/Q4_K, Q8_0, ...) stays quantized: its 4-bit layers load as int4
        exactly, the rest as int8 (``quant.quantize.quantized_from_gguf``). A ``dtype`` (float32, bfloat16),
        ``dequantize=True``, ``quantize`` or ``adapter`` gives the dense model instead (dequantized, then
        quantized as asked). Other sources load in ``dtype`` (default float32).
        ``compile``: decode through the compiled static step (``scratchlm.compiled``; cached on disk, checked,
        eager fallback). None (default): where ``compiled.use_compiled_by_default`` says it is faster, built by a
        background process on the first run (decoding eagerly meanwhile), loaded by later runs; True: compiled,
        the first call of each shape builds its package and waits; False: eager. ``$SCRATCHLM_COMPILE=1`` or
        ``0`` stands for True or False when ``compile`` is None.
        """
        from scratchlm.hub import KNOWN_MODELS, resolve

        if quantize is not None:
            from scratchlm.quant.quantize import check_options

            check_options(quantize, group_size)  # before the slow part
        path = resolve(name_or_path)
        keep_quantized = dtype is None and not dequantize and quantize is None and adapter is None
        torch_dtype = parse_dtype(dtype or "float32")
        name = str(name_or_path) if str(name_or_path) in KNOWN_MODELS else path.stem
        tok_path = Path(tokenizer).expanduser() if tokenizer is not None else None
        if path.is_file() and path.suffix == ".gguf" and tok_path is None:
            llm = cls._from_gguf(path, torch_dtype, name, keep_quantized)
        elif path.is_dir() or (path.is_file() and path.suffix in TORCH_SUFFIXES):
            llm = cls._from_directory(path, torch_dtype, name, tok_path)
        elif path.is_file() and path.suffix == ".gguf":
            raise ConfigError("a GGUF file carries its own tokenizer: drop the tokenizer option")
        else:
            raise ModelFileError(f"{path} is neither a .gguf file, a PyTorch checkpoint "
                                 f"({', '.join(TORCH_SUFFIXES)}) nor a model directory")
        if adapter is not None:
            from scratchlm.finetune.peft import load_adapter

            load_adapter(llm.model, adapter)
        if quantize is not None:
            from scratchlm.quant import quantize_model

            quantize_model(llm.model, quantize, group_size)
        llm.model.to(device)
        from scratchlm.compiled import compile_decoding, compile_setting, use_compiled_by_default

        compile = compile_setting() if compile is None else compile  # $SCRATCHLM_COMPILE=0/1: as --(no-)compile
        if compile or (compile is None and use_compiled_by_default(llm.model)):
            # How to load this model again: a background process builds the compiled step's packages from it.
            recipe = dict(name_or_path=str(path.resolve()), dtype=str(torch_dtype).removeprefix("torch.") if dtype
                          else None, quantize=quantize, group_size=group_size, dequantize=dequantize,
                          adapter=os.path.abspath(adapter) if adapter is not None else None,
                          tokenizer=str(tok_path.resolve()) if tok_path is not None else None)
            # compile=None (the default): missing packages are built in the background while decoding eagerly;
            # compile=True: the first decode step of each shape builds its package and waits for it.
            compile_decoding(llm.model, recipe=recipe, background=compile is None)
        return llm

    @classmethod
    def _from_gguf(cls, path: Path, dtype: torch.dtype, name: str, keep_quantized: bool = False) -> LLM:
        from scratchlm.formats.gguf import load_gguf, load_gguf_quantized

        if keep_quantized:
            config, state, meta, quantized = load_gguf_quantized(path, dtype)
        else:
            (config, state, meta), quantized = load_gguf(path, dtype), False
        config = config.replace(name=name)
        tokenizer = Tokenizer.from_gguf_metadata(meta)
        template = ChatTemplate(meta.get("tokenizer.chat_template"), tokenizer.bos_token, tokenizer.eos_token)
        if quantized:
            from scratchlm.quant.quantize import quantized_from_gguf

            model = quantized_from_gguf(config, state, dtype, source=str(path))
            model.config = config
        else:
            model = build_model(config, state, source=str(path))
        return cls(model, tokenizer, template, name, path)

    @classmethod
    def _from_directory(cls, path: Path, dtype: torch.dtype, name: str, tokenizer: Path | None = None) -> LLM:
        """A model directory, or a PyTorch checkpoint file (nanoGPT ``ckpt.pt``, litgpt ``lit_model.pth``)."""
        from scratchlm.quant.checkpoint import is_quantized_dir, load_quantized_dir

        model = None
        if path.is_dir() and is_quantized_dir(path):
            config, model = load_quantized_dir(path, dtype)
        else:
            config, state = _read_weights(path, dtype)
        config = config.replace(name=name)
        directory = path if path.is_dir() else path.parent
        tokenizer_obj, template, eos_ids = _read_tokenizer(directory, tokenizer, path)
        if model is None:
            model = build_model(config, state, source=str(path))
        model.config = config
        return cls(model, tokenizer_obj, template, name, path, eos_ids)

    # ----------------------------------------------------------------------------------------------
    def sampling(self, **kwargs) -> SamplingParams:
        """SamplingParams from keyword arguments over ``DEFAULT_SAMPLING`` (``sampling.with_defaults``; ``stop``
        may be a string or a list). Structured output: ``response_format`` (OpenAI's), ``json_schema``, ``regex``
        or ``grammar`` (GBNF text or a ``structured.Constraint``) become ``constraint`` (docs/structured-output.md)."""
        structured = {k: kwargs.pop(k) for k in STRUCTURED_KEYWORDS if k in kwargs}
        if any(v is not None for v in structured.values()):
            from scratchlm.structured import make_constraint

            kwargs["constraint"] = make_constraint(**structured)
        unknown = set(kwargs) - set(SamplingParams.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown sampling options {sorted(unknown)}; "
                              f"known: {', '.join(SamplingParams.__dataclass_fields__)}")
        if isinstance(kwargs.get("stop"), (list, tuple)):
            kwargs["stop"] = tuple(kwargs["stop"])
        return SamplingParams(**with_defaults(**kwargs))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        text = self.template.render(messages, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, allowed_special="all")

    def _prompt_ids(self, prompt: str | list[dict] | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, allowed_special="all")
        if _is_messages(prompt):
            return self.encode_chat(prompt)
        if _is_ids(prompt):
            return prompt
        raise ConfigError("a prompt must be a string, a list of chat messages, or a list of token ids")

    def sequences(self, prompts: list, params: SamplingParams, context_shift: bool = False) -> list[Sequence]:
        """One ``Sequence`` per prompt (text, messages or token ids), checked against the context window."""
        cfg = self.config
        return [Sequence(self._prompt_ids(p), params, self.tokenizer, self.eos_ids, cfg.vocab_size,
                         cfg.context_length, context_shift) for p in prompts]

    def draft_model(self, draft) -> str | Transformer:
        """What ``draft=`` names, checked: ``"ngram"`` (prompt lookup), or the model of a draft ``LLM`` (given, or
        loaded from a name or path once and kept) whose tokenizer is this model's."""
        if draft == "ngram":
            return "ngram"
        if isinstance(draft, LLM):
            other, name = draft, draft.name
        elif isinstance(draft, (str, os.PathLike)):
            loaded = self.__dict__.setdefault("_drafts", {})
            if str(draft) not in loaded:
                loaded[str(draft)] = LLM.load(draft)
            other, name = loaded[str(draft)], str(draft)
        else:
            raise ConfigError(f"draft must be 'ngram', a model name or path, or an LLM, not {type(draft).__name__}")
        from scratchlm.speculative import check_same_vocabulary

        check_same_vocabulary(self, other, name)
        return other.model

    def _decoding(self, options: dict) -> dict:
        """``stream_sequences`` keyword arguments from the decoding options (``DECODING_KEYWORDS``) of a call:
        ``draft`` ("ngram", a model name or path, or an LLM) and ``draft_tokens`` (K, at most drafted per step);
        ``context_shift`` (True, "recompute" or "rotate") and ``keep`` (tokens kept at the start, implies a
        shift); ``stats``, a ``DecodeStats`` to fill."""
        from scratchlm.speculative import check_draft_tokens

        run = {"stats": options.get("stats")}
        draft, draft_tokens = options.get("draft"), options.get("draft_tokens")
        check_draft_tokens(draft_tokens)
        if draft is not None:
            run.update(draft=self.draft_model(draft), draft_tokens=draft_tokens)
        elif draft_tokens is not None:
            raise ConfigError("draft_tokens needs a drafter: add draft='ngram' or a draft model")
        shift, keep = options.get("context_shift"), options.get("keep")
        if shift or keep is not None:
            mode = shift if isinstance(shift, str) else "recompute"
            run["shift"] = ContextShift(0 if keep is None else keep, mode)
        return run

    def _start(self, prompts: list, sampling: dict) -> tuple[list[Sequence], dict]:
        options = {k: sampling.pop(k) for k in DECODING_KEYWORDS if k in sampling}
        run = self._decoding(options)
        return self.sequences(prompts, self.sampling(**sampling), context_shift="shift" in run), run

    # One rule for generate, complete, chat and stream (and the server's ``prompt``): a string, a list of token
    # ids, or (for chat) a list of message dicts is ONE prompt; a list of those is a batch, answered as a list.
    def complete(self, prompt: str | list, **sampling) -> Completion | list[Completion]:
        """Complete one prompt (a Completion) or a batch of prompts together (a list, one Completion each).

        A prompt is a text, a list of token ids, or a conversation (a list of message dicts); different
        lengths in one batch are fine. Besides the sampling options: ``draft="ngram"`` or a draft model (name,
        path or LLM) with ``draft_tokens=K`` for speculative decoding, ``context_shift=True`` and ``keep=N`` to
        go on past the context window, ``stats=DecodeStats()`` to receive counts (docs/decoding.md).
        """
        prompts, batch = _one_or_batch(prompt)
        seqs, run = self._start(prompts, sampling)
        for _ in stream_sequences(self.model, seqs, **run):
            pass
        results = [s.completion() for s in seqs]
        return results if batch else results[0]

    def generate(self, prompt: str | list, **sampling) -> str | list[str]:
        """Continue a text (a str), or each text of a list (batched, a list); returns the new text only."""
        result = self.complete(prompt, **sampling)
        return [c.text for c in result] if isinstance(result, list) else result.text

    def chat(self, messages: str | list, tools: list | None = None, tool_choice=None,
             parallel_tool_calls: bool | None = None, tool_format: str = "generic", **sampling) -> str | list | dict:
        """The assistant's reply to one conversation (a list of ``{"role", "content"}`` dicts, or a string as
        one user message), or a list of replies to a list of conversations (batched).

        With ``tools`` (Python functions, ``scratchlm.tools.Tool`` objects or OpenAI tool dicts) the reply is an
        OpenAI assistant message dict, ``{"role": "assistant", "content": str | None, "tool_calls": [...]}``, with
        ``tool_choice`` ("auto", "none", "required", a tool's name, or OpenAI's forms) and ``parallel_tool_calls``
        as in OpenAI's API; the calls' arguments always match the tools' schemas (docs/tools.md).
        """
        if tools is not None or tool_choice is not None:
            from scratchlm.tools import chat_with_tools

            if not (isinstance(messages, str) or _is_messages(messages)):
                raise ConfigError("chat with tools takes one conversation, not a batch")
            return chat_with_tools(self, _conversation(messages), tools or [], tool_choice, parallel_tool_calls,
                                   tool_format, **sampling)
        if isinstance(messages, str) or _is_messages(messages):
            return self.complete(_conversation(messages), **sampling).text
        if not isinstance(messages, list) or not messages:
            raise ConfigError("chat takes a conversation (a list of {'role', 'content'} dicts, or a string), "
                              "or a non-empty list of conversations")
        return [c.text for c in self.complete([_conversation(m) for m in messages], **sampling)]

    def stream(self, prompt: str | list, **sampling) -> Iterator[str] | Iterator[tuple[int, str]]:
        """Yield the continuation of one prompt (text, token ids or messages) chunk by chunk as it is made; for a
        batch (a list of prompts), yield ``(index, chunk)`` pairs as each prompt releases text."""
        prompts, batch = _one_or_batch(prompt)
        seqs, run = self._start(prompts, sampling)
        for row, text in stream_sequences(self.model, seqs, **run):
            yield (row, text) if batch else text

    def __repr__(self) -> str:
        cfg = self.config
        return (f"LLM({self.name!r}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
                f"{self.model.num_parameters() / 1e6:.1f}M parameters)")


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def _one_or_batch(prompt) -> tuple[list, bool]:
    """``([prompt], False)`` for one prompt (a text, token ids, messages); ``(prompts, True)`` for a batch."""
    if isinstance(prompt, str) or _is_ids(prompt) or _is_messages(prompt):
        return [prompt], False
    if isinstance(prompt, (list, tuple)) and prompt:
        return list(prompt), True
    raise ConfigError("give a prompt (a string, token ids or chat messages) or a non-empty list of prompts")


def _conversation(messages) -> list[dict]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if _is_messages(messages):
        return messages
    raise ConfigError("a conversation is a list of {'role', 'content'} dicts (or a string as one user message)")
