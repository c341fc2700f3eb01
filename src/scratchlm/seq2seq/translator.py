"""A trained translator on disk and in memory: the model, its two tokenizers, translate and score.

    from scratchlm.seq2seq import Translator
    translator = Translator.load("runs/seq2seq")                 # a run folder (its best checkpoint) or a checkpoint
    translator.translate(["seventy-one thousand eighty"])        # ['soixante et onze mille quatre-vingts']
    translator.translate(texts, beam_size=4)
    translator.bleu(pairs)                                       # sacreBLEU's corpus BLEU, 0-100

A translator directory holds:

    seq2seq_config.json       Seq2SeqConfig.to_dict()
    model.safetensors         the weights (names in seq2seq/model.py; tied matrices stored once)
    source_tokenizer.json     HF-compatible byte-level BPE of each side
    target_tokenizer.json     (with a shared vocabulary, the same tokenizer twice)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from scratchlm.errors import ConfigError, ModelFileError
from scratchlm.files import atomic_write_bytes, atomic_write_json, read_json
from scratchlm.seq2seq.data import BOS, EOS, encode_source
from scratchlm.seq2seq.model import Seq2Seq, Seq2SeqConfig
from scratchlm.seq2seq.search import beam_search, greedy_search
from scratchlm.tokenizer import Tokenizer

CONFIG_FILE = "seq2seq_config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("source_tokenizer.json", "target_tokenizer.json")


def save_translator(directory: str | Path, model: Seq2Seq, source_tokenizer: Tokenizer,
                    target_tokenizer: Tokenizer) -> Path:
    """Write the translator files into ``directory`` (each file atomically)."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_to_save().items()}
    atomic_write_bytes(directory / WEIGHTS_FILE, save(tensors, metadata={"format": "scratchlm-seq2seq"}))
    atomic_write_json(directory / CONFIG_FILE, model.config.to_dict())
    for name, tokenizer in zip(TOKENIZER_FILES, (source_tokenizer, target_tokenizer)):
        tokenizer.save(directory / name)
    return directory


def load_weights(model: Seq2Seq, directory: Path) -> None:
    """Put the weights of ``directory/model.safetensors`` into ``model``, checked name by name and shape by shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / WEIGHTS_FILE
    try:
        weights = load_file(path)
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing: {directory} is not a complete translator") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not a readable safetensors file ({exc})") from None
    expected = model.state_to_save()
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise ModelFileError(f"{path} does not fit its {CONFIG_FILE} (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise ModelFileError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected "
                                 f"{tuple(expected[name].shape)}")
    model.load_state_dict(weights, strict=False)


def find_translator(path: str | Path) -> Path:
    """The translator directory at ``path``: itself, or a run folder's best (else last) checkpoint."""
    path = Path(path).expanduser()
    for candidate in (path, path / "best", path / "last"):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    if not path.exists():
        raise ModelFileError(f"{path} does not exist: give a folder written by `scratchlm seq2seq train --out DIR`")
    raise ModelFileError(f"{path} holds no translator ({CONFIG_FILE}): give a folder written by "
                         "`scratchlm seq2seq train --out DIR`, or one of its checkpoints")


class Translator:
    """A Seq2Seq model with its source and target tokenizers."""

    def __init__(self, model: Seq2Seq, source_tokenizer: Tokenizer, target_tokenizer: Tokenizer):
        self.model = model.eval()
        self.source_tokenizer = source_tokenizer
        self.target_tokenizer = target_tokenizer

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Translator:
        """A translator from a folder written by ``scratchlm seq2seq train`` (see ``find_translator``)."""
        directory = find_translator(path)
        config = Seq2SeqConfig.from_dict(read_json(directory / CONFIG_FILE))
        tokenizers = []
        for name in TOKENIZER_FILES:
            tokenizer = Tokenizer.from_file(directory / name, bos_token=BOS, eos_token=EOS)
            tokenizers.append(tokenizer)
        sizes = (config.source_vocab_size, config.target_vocab_size)
        for name, tokenizer, size in zip(TOKENIZER_FILES, tokenizers, sizes):
            if tokenizer.vocab_size != size:
                raise ModelFileError(f"{directory / name} has {tokenizer.vocab_size} tokens but the model expects "
                                     f"{size}: the files come from different runs")
        model = Seq2Seq(config)
        load_weights(model, directory)
        return cls(model.to(device), *tokenizers)

    def save(self, directory: str | Path) -> Path:
        """Write the translator files (see the module doc)."""
        return save_translator(directory, self.model, self.source_tokenizer, self.target_tokenizer)

    def translate(self, texts: str | Sequence[str], beam_size: int = 1, length_penalty: float = 1.0,
                  batch_size: int = 256) -> list[str]:
        """Translations of ``texts`` (a single string gives a one-element list): greedy search for
        ``beam_size=1``, beam search otherwise."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(beam_size, int) or beam_size < 1:
            raise ConfigError(f"beam size must be a positive integer, got {beam_size!r}")
        sources = [encode_source(self.source_tokenizer, text.strip()) for text in texts]
        out: list[str] = []
        for start in range(0, len(sources), batch_size):
            chunk = sources[start:start + batch_size]
            if beam_size == 1:
                ids = greedy_search(self.model, chunk)
            else:
                ids = beam_search(self.model, chunk, beam_size=beam_size, length_penalty=length_penalty)
            out.extend(self.target_tokenizer.decode(row, skip_special=True).strip() for row in ids)
        return out

    def bleu(self, pairs: Sequence[tuple[str, str]], beam_size: int = 1) -> dict[str, float]:
        """Corpus BLEU (sacreBLEU's, 0-100) and exact match (0-1) of the translations of ``pairs``' sources."""
        from scratchlm.eval.metrics import corpus_bleu, exact_match

        hypotheses = self.translate([s for s, _ in pairs], beam_size=beam_size)
        references = [t for _, t in pairs]
        return {"bleu": corpus_bleu(hypotheses, references),
                "exact_match": sum(exact_match(h, r) for h, r in zip(hypotheses, references)) / max(len(pairs), 1)}
