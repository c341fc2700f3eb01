"""Sentence embeddings: a BERT encoder, a pooling head, and L2 normalisation, as sentence-transformers does.

    from scratchlm.encoder import Encoder
    enc = Encoder.load("all-minilm-l6-v2")        # after `scratchlm pull all-minilm-l6-v2`
    vectors = enc.embed(["a cat sat", "a dog ran"])  # torch.float32 [2, 384], each row of length 1

A text goes: WordPiece ids ``[CLS] ... [SEP]`` (cut to ``max_tokens``) -> the ``Transformer`` with
``causal=False`` (every token sees the whole text) -> hidden states [T, C] -> pooling into one vector
(the mean over the tokens, or the [CLS] token's state) -> divided by its length when the model says so.
Texts of one batch are padded on the right; the padding mask keeps them out of attention and of the mean.

A sentence-transformers directory says how to pool: ``modules.json`` lists the modules (Transformer, Pooling,
Normalize), ``1_Pooling/config.json`` picks the pooling mode and ``sentence_bert_config.json`` the maximum
sequence length.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from scratchlm.errors import ModelFileError, UnsupportedError
from scratchlm.files import read_json
from scratchlm.model import Transformer, build_model
from scratchlm.wordpiece import WordPiece

POOLINGS = ("mean", "cls")


def read_pooling(directory: Path) -> tuple[str, bool]:
    """(pooling mode, whether to L2-normalise) from a sentence-transformers directory; ("mean", False) without one."""
    modules_path = directory / "modules.json"
    if not modules_path.is_file():
        return "mean", False
    pooling, normalize = "mean", False
    for module in read_json(modules_path):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            config_path = directory / module.get("path", "1_Pooling") / "config.json"
            config = read_json(config_path) if config_path.is_file() else {"pooling_mode": "mean"}
            # sentence-transformers 6 writes "pooling_mode": "mean"; earlier versions one boolean per mode
            modes = [config["pooling_mode"]] if isinstance(config.get("pooling_mode"), str) else \
                [m.removeprefix("pooling_mode_") for m, on in config.items() if m.startswith("pooling_mode_") and on]
            names = {"mean": "mean", "mean_tokens": "mean", "cls": "cls", "cls_token": "cls"}
            if len(modes) != 1 or modes[0] not in names:
                raise UnsupportedError(f"{config_path}: pooling {modes} is not supported (mean or cls)")
            pooling = names[modes[0]]
        elif kind not in ("Transformer", "BertModel"):
            raise UnsupportedError(f"{modules_path}: sentence-transformers module {kind!r} is not supported")
    return pooling, normalize


def read_max_tokens(directory: Path) -> int | None:
    """The longest input sentence-transformers feeds the model: ``max_seq_length`` in sentence_bert_config.json
    (older versions) or the tokenizer's ``model_max_length`` (newer ones); None when neither says."""
    for file, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        path = directory / file
        value = read_json(path).get(key) if path.is_file() else None
        if isinstance(value, int) and 0 < value < 1_000_000:  # HF writes a huge number when there is no limit
            return value
    return None


class Encoder:
    """A text encoder: ``embed(texts)`` -> float32 tensor [N, dim].

    ``name``, ``dim`` (embedding size), ``max_tokens`` (longest input in tokens, [CLS] and [SEP] included:
    longer texts are cut, with a warning) and ``tokenizer`` (``tokenizer.encode(text)`` counts tokens).
    """

    def __init__(self, model: Transformer, tokenizer: WordPiece, *, name: str = "encoder", pooling: str = "mean",
                 normalize: bool = True, max_tokens: int | None = None):
        if model.config.causal:
            raise UnsupportedError(f"{name} is a causal (decoder) model; embeddings need an encoder (causal=False)")
        if pooling not in POOLINGS:
            raise UnsupportedError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.pooling = pooling
        self.normalize = normalize
        self.max_tokens = min(max_tokens or model.config.context_length, model.config.context_length)

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def __repr__(self) -> str:
        return (f"Encoder({self.name!r}, dim={self.dim}, max_tokens={self.max_tokens}, pooling={self.pooling!r}, "
                f"normalize={self.normalize})")

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> Encoder:
        """A pulled encoder by name (``all-minilm-l6-v2``) or an HF / sentence-transformers BERT directory."""
        from scratchlm.formats.bert import load_bert
        from scratchlm.hub import resolve

        directory = resolve(name_or_path)
        if not directory.is_dir():
            raise ModelFileError(f"{directory} is not a model directory; an encoder is an HF BERT directory "
                                 "(config.json, model.safetensors, tokenizer.json or vocab.txt)")
        config, state = load_bert(directory, dtype=dtype)
        model = build_model(config, state, source=str(directory)).to(device)
        pooling, normalize = read_pooling(directory)
        max_tokens = read_max_tokens(directory)
        name = str(name_or_path) if not Path(str(name_or_path)).exists() else directory.name
        return cls(model, WordPiece.from_file(directory), name=name, pooling=pooling, normalize=normalize,
                   max_tokens=max_tokens)

    # ----------------------------------------------------------------------------------------------
    def prepare(self, texts: list[str]) -> list[list[int]]:
        """The model inputs of ``texts``: ``[CLS] ids [SEP]``, cut to ``max_tokens`` (with a warning if any is)."""
        inputs, cut = [], 0
        for text in texts:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            cut += len(ids) + 2 > self.max_tokens
            inputs.append(self.tokenizer.with_special_tokens(ids, self.max_tokens))
        if cut:
            warnings.warn(f"{cut} of {len(texts)} texts are longer than {self.name}'s {self.max_tokens} tokens "
                          "and were truncated; split long documents into chunks", stacklevel=3)
        return inputs

    def embed(self, texts: str | list[str], batch_size: int = 32) -> torch.Tensor:
        """Embeddings of ``texts``, float32 [N, dim] in input order (a single string gives [1, dim])."""
        if isinstance(texts, str):
            texts = [texts]
        return self.embed_ids(self.prepare(list(texts)), batch_size=batch_size)

    @torch.inference_mode()
    def embed_ids(self, inputs: list[list[int]], batch_size: int = 32) -> torch.Tensor:
        """Embeddings of already tokenised inputs (each ``[CLS] ... [SEP]``, at most ``max_tokens`` ids)."""
        device = next(self.model.parameters()).device
        out = torch.empty(len(inputs), self.dim, dtype=torch.float32)
        # Batch texts of similar length together: less padding, same results (padding is masked out).
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(inputs[i]) for i in rows)
            if width > self.max_tokens:
                raise ValueError(f"an input has {width} tokens; {self.name} takes at most {self.max_tokens}")
            ids = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.bool)
            for r, i in enumerate(rows):
                ids[r, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
                mask[r, : len(inputs[i])] = True
            ids, mask = ids.to(device), mask.to(device)
            hidden = self.model.hidden_states(ids, padding_mask=mask).float()  # (B, T, C)
            out[rows] = pool(hidden, mask, self.pooling, self.normalize).cpu()
        return out


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str = "mean", normalize: bool = True) -> torch.Tensor:
    """One vector per row of ``hidden`` [B, T, C]: the mean over real tokens (``mask`` [B, T]) or the first
    token's state, optionally scaled to unit L2 length."""
    if pooling == "cls":
        vectors = hidden[:, 0]
    else:
        weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        # sentence-transformers clamps the token count at 1e-9 so that an empty row divides safely
        vectors = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return F.normalize(vectors, p=2, dim=-1) if normalize else vectors
