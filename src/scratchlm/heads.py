"""Task heads: a transformer body read at its last real token by a small linear layer with N outputs.

    model = HeadModel(llm.model, n_outputs=1)             # a reward model (N = 1) or a value head
    scores = model(input_ids, lengths)                     # [B, N]: one row of N numbers per sequence

This is the shape of HF's ``*ForSequenceClassification`` (InstructGPT's reward model, Ouyang et al. 2022,
section 3.5: "the final unembedding layer removed", a scalar projection in its place): the body's final-norm
hidden state at the last real token of each sequence, times a [N, d_model] matrix. A causal model's last token
has seen the whole sequence, so it summarises it. Batches are right-padded; ``lengths`` (real tokens per row)
says where each row ends, so the pad id never matters (HF infers the position from the pad id, which breaks
when pad = EOS and EOS also ends a chat turn).

The same machinery serves the reward model (N = 1, ``scratchlm align reward``), PPO's value head and
sequence classification (N labels).

A saved head model is one directory (``save_head_model`` / ``load_head_model``):

    head_config.json     {"n_outputs", "labels", "bias", "task", "body": "model" | "adapter", "base_model"}
    head.safetensors     the head's weight [N, d_model] (and bias [N])
    body "model":        a full model directory beside it (model_config.json, model.safetensors, tokenizer)
    body "adapter":      a PEFT LoRA adapter beside it (adapter_config.json, adapter_model.safetensors); the
                         base model is read from ``base_model`` (or given to ``load_head_model``)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from scratchlm.errors import ConfigError, ModelFileError
from scratchlm.files import atomic_write_bytes, atomic_write_json, read_json

HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = "head.safetensors"
FORMAT = "scratchlm-head"


def last_token_states(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The hidden state [B, C] of each row's last real token, from hidden states [B, T, C] of right-padded rows
    with ``lengths`` [B] real tokens."""
    if bool((lengths < 1).any()) or bool((lengths > hidden.shape[1]).any()):
        raise ValueError(f"lengths must lie in 1..{hidden.shape[1]}, got {lengths.tolist()}")
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, lengths.to(hidden.device) - 1]


class HeadModel(nn.Module):
    """A transformer ``body`` and a linear ``head`` [N, d_model] applied at each sequence's last real token.

    ``labels`` names the outputs of a classifier (None for a reward or value head); ``bias`` adds a bias to the
    head (HF's sequence-classification heads have none: a reward's offset does not change a preference).
    """

    def __init__(self, body: nn.Module, n_outputs: int = 1, labels: list[str] | None = None, bias: bool = False,
                 task: str = "reward"):
        super().__init__()
        if not isinstance(n_outputs, int) or n_outputs < 1:
            raise ConfigError(f"a head needs at least one output, got {n_outputs!r}")
        if labels is not None and len(labels) != n_outputs:
            raise ConfigError(f"{len(labels)} labels for a head of {n_outputs} outputs")
        self.body = body
        self.labels = list(labels) if labels is not None else None
        self.task = task
        weight = next(body.parameters())
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.head = nn.Linear(body.config.d_model, n_outputs, bias=bias, device=weight.device, dtype=dtype)
        nn.init.normal_(self.head.weight, std=0.02)  # HF's initializer_range
        if bias:
            nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        """The body's ModelConfig (the training loop records it in checkpoints)."""
        return self.body.config

    @property
    def n_outputs(self) -> int:
        return self.head.out_features

    @property
    def gradient_checkpointing(self) -> bool:
        return self.body.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.body.gradient_checkpointing = value

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B, N] for right-padded ``input_ids`` [B, T] with ``lengths`` [B] real tokens (default: all T)."""
        hidden = self.body.hidden_states(input_ids)  # (B, T, C)
        if lengths is None:
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
        pooled = last_token_states(hidden, lengths)  # (B, C)
        return self.head(pooled.to(self.head.weight.dtype))

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}


def _head_config(model: HeadModel, body: str, base_model: str | None) -> dict:
    return {"format": FORMAT, "task": model.task, "n_outputs": model.n_outputs, "labels": model.labels,
            "bias": model.head.bias is not None, "pooling": "last_token", "body": body, "base_model": base_model}


def save_head_model(directory: str | Path, model: HeadModel, tokenizer=None, chat_template: str | None = None,
                    lora=None, base_model: str | None = None, fingerprint: dict | None = None) -> Path:
    """Write ``model`` into ``directory``: the head, and the body as a full model directory, or (``lora``: the
    body's ``LoraSettings``) as a PEFT adapter for ``base_model`` (its name or path, recorded for loading)."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if lora is None:
        from scratchlm.formats.checkpoint import save_model_dir

        save_model_dir(directory, model.body.config, model.body.canonical_state_dict(), tokenizer, chat_template)
    else:
        from scratchlm.finetune.peft import save_adapter
        from scratchlm.finetune.run import HF_REPOS

        # PEFT users find the base under its HF name; load_head_model reads ours from head_config.json.
        save_adapter(directory, model.body, lora, HF_REPOS.get(str(base_model), base_model), fingerprint)
    atomic_write_bytes(directory / HEAD_WEIGHTS, save(model.head_state_dict(), metadata={"format": FORMAT}))
    atomic_write_json(directory / HEAD_CONFIG, _head_config(model, "model" if lora is None else "adapter",
                                                            base_model))
    return directory


def read_head_config(directory: str | Path) -> dict:
    """The checked ``head_config.json`` of a head model directory."""
    path = Path(directory) / HEAD_CONFIG
    if not path.is_file():
        raise ModelFileError(f"{directory} is not a reward or classifier model: {HEAD_CONFIG} is missing "
                             "(train one with `scratchlm align reward`)")
    config = read_json(path)
    if config.get("format") != FORMAT or config.get("body") not in ("model", "adapter"):
        raise ModelFileError(f"{path} is not a scratchlm head configuration")
    return config


def load_head(model: HeadModel, directory: str | Path) -> None:
    """Copy the head weights saved in ``directory`` into ``model.head`` (shapes checked)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / HEAD_WEIGHTS
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is missing or not a readable safetensors file: {exc}") from None
    expected = {k: tuple(v.shape) for k, v in model.head.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        raise ModelFileError(f"{path} holds {found}, the head needs {expected}: it was saved for another model")
    with torch.no_grad():
        for name, tensor in state.items():
            getattr(model.head, name).copy_(tensor)


def load_head_model(directory: str | Path, base: str | None = None, dtype: str = "float32",
                    trainable_adapter: bool = False):
    """Load a head model saved by ``save_head_model``; returns ``(HeadModel, LLM)`` where ``llm.model`` is the body
    (so the same object generates text and scores it).

    Args:
        base: the base model of an adapter body (default: the one recorded in ``head_config.json``).
        trainable_adapter: keep an adapter body as trainable LoRA layers instead of merging it in.
    """
    from scratchlm.llm import LLM

    directory = Path(directory)
    config = read_head_config(directory)
    if config["body"] == "model":
        llm = LLM.load(directory, dtype=dtype)
    else:
        base = base or config.get("base_model")
        if not base:
            raise ConfigError(f"{directory} holds a LoRA adapter without its base model's name: give the base model")
        llm = LLM.load(base, dtype=dtype)
        from scratchlm.finetune.peft import load_adapter

        load_adapter(llm.model, directory, merge=not trainable_adapter)
    model = HeadModel(llm.model, config["n_outputs"], config.get("labels"), bool(config.get("bias")),
                      config.get("task", "reward"))
    load_head(model, directory)
    return model.eval(), llm
