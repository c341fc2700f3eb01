"""Calibration data for post-training compression (GPTQ, Wanda): text -> token windows -> each block's inputs.

GPTQ (Frantar et al. 2022, section 4) and Wanda (Sun et al. 2023, section 3) both look at the *inputs* a layer
sees on a little real text (128 windows of 2,048 tokens of C4 in the papers) and never at labels. Both work one
transformer block at a time: the hidden states entering block i are computed once, block i is compressed, and
the states are passed through the compressed block to become block i+1's inputs, so every block is fitted to
what the blocks before it really produce after compression.

    tokens = calibration_tokens(llm.tokenizer, "corpus.txt", samples=128, seq_len=512)    # [128, 512] ids
    states = block_inputs(llm.model, tokens)               # hidden states entering block 0
    for block in llm.model.blocks:
        with capture_inputs(block, ["attn.q_proj"], lambda name, x: ...):  # every input the layer sees
            run_block(block, states)
        ...compress the block's layers...
        states = run_block(block, states)                  # the inputs of the next block
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from scratchlm.errors import DataError

DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 512


def calibration_tokens(tokenizer, path: str | os.PathLike, samples: int = DEFAULT_SAMPLES,
                       seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens from the text file ``path``: int64 [samples, seq_len].

    The text is tokenized whole and cut into non-overlapping windows; ``samples`` of them are drawn at random
    (``seed``) so that the calibration covers the whole file, not its first pages. Raises a DataError that
    says how many windows the file holds when it is too short for ``samples`` of them.
    """
    if samples < 1 or seq_len < 2:
        raise DataError(f"calibration needs at least 1 sample of at least 2 tokens, got {samples} x {seq_len}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"calibration file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the calibration file {path} as UTF-8 text: {exc}") from None
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    windows = len(ids) // seq_len
    if windows < samples:
        raise DataError(f"{path} has {len(ids):,} tokens, enough for {windows} calibration windows of {seq_len}; "
                        f"{samples} x {seq_len} = {samples * seq_len:,} tokens are needed: give a longer text "
                        "or lower --samples / --seq-len")
    chosen = torch.randperm(windows, generator=torch.Generator().manual_seed(seed))[:samples].sort().values
    return ids[: windows * seq_len].view(windows, seq_len)[chosen].contiguous()


@dataclass
class BlockInputs:
    """What a block's ``forward(x, rope, cache, positions, mask)`` receives for the calibration set: the hidden
    states, one tensor per batch, and the arguments that depend only on the batch shape (shared by all)."""

    hidden: list[torch.Tensor]  # each [batch, seq_len, d_model]
    rope: tuple[torch.Tensor, torch.Tensor] | None
    positions: torch.Tensor
    mask: object  # model.AttentionMask

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


class _Stop(Exception):
    """Raised by the capturing hook to end a forward pass at block 0."""


@torch.no_grad()
def block_inputs(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8) -> BlockInputs:
    """The hidden states entering ``model.blocks[0]`` for ``tokens`` [N, T], computed ``batch_size`` rows at a time.

    Runs the model's own embedding code (positions, RoPE tables, masks) and stops it at the first block, so
    whatever the architecture adds before the blocks is included exactly.
    """
    device = next(model.parameters()).device
    captured: list = []

    def hook(module, args):
        captured.append(args)
        raise _Stop

    handle = model.blocks[0].register_forward_pre_hook(hook)
    try:
        for batch in tokens.split(batch_size):
            try:
                model.hidden_states(batch.to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    _, rope, _, positions, mask = captured[0]
    # the first batch is the widest; run_block slices positions and RoPE tables for a shorter last batch
    return BlockInputs([args[0] for args in captured], rope, positions, mask)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """``block`` applied to every batch of ``inputs``: the inputs of the next block."""
    out = []
    for x in inputs.hidden:
        b = x.shape[0]
        rope = None if inputs.rope is None else tuple(t[:b] for t in inputs.rope)
        out.append(block(x, rope, None, inputs.positions[:b], inputs.mask))
    return BlockInputs(out, inputs.rope, inputs.positions, inputs.mask)


@contextlib.contextmanager
def capture_inputs(module: nn.Module, names: Sequence[str],
                   fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While active, call ``fn(name, x)`` with the input ``x`` [..., in_features] of every forward of each
    submodule ``module.get_submodule(name)`` (GPTQ accumulates a Hessian from them, Wanda a column norm)."""
    handles = []
    try:
        for name in names:
            def hook(_module, args, name=name):
                fn(name, args[0].detach())
            handles.append(module.get_submodule(name).register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def inputs_of(block: nn.Module, inputs: BlockInputs, name: str, fn: Callable[[torch.Tensor], None]) -> None:
    """Feed every batch of ``inputs`` to ``block`` and call ``fn(x)`` with what its submodule ``name`` receives;
    the rest of the block is skipped (the layers after ``name`` are not needed to know its input)."""
    def hook(_module, args):
        fn(args[0].detach())
        raise _Stop

    handle = block.get_submodule(name).register_forward_pre_hook(hook)
    try:
        for x in inputs.hidden:
            b = x.shape[0]
            rope = None if inputs.rope is None else tuple(t[:b] for t in inputs.rope)
            try:
                block(x, rope, None, inputs.positions[:b], inputs.mask)
            except _Stop:
                continue
            raise RuntimeError(f"{name} was not called in the block's forward")
    finally:
        handle.remove()


class SequentialPasses:
    """The inputs of a block's linear layers group after group (``block_linears``' order, true-sequential GPTQ),
    each pass reusing what the one before computed instead of running the block from its start again.

    The caller quantizes each group before asking for the next group's inputs. Then the attention's output before
    its last product (``attn.o_proj``'s input) no longer changes once q/k/v are quantized, nor the MLP's input once
    o is: they are kept (one [tokens, width] tensor each), and the later passes run only ``o_proj`` on the first
    and only the MLP on the second. The results are those of running the whole block each time (tested), at
    about half the work: the attention is computed once per block instead of four times.

        passes = SequentialPasses(block, states)
        for names in block_linears(block):
            passes.feed(names[0], hessian.add)      # every input of that layer, with the layers before quantized
            ...quantize the group...
        states = passes.outputs()                   # the next block's inputs
    """

    def __init__(self, block: nn.Module, inputs: BlockInputs):
        self.block, self.inputs = block, inputs
        self.attn_out: list[torch.Tensor] | None = None  # o_proj's inputs, per batch
        self.mlp_in: list[torch.Tensor] | None = None  # the MLP's inputs, per batch

    @contextlib.contextmanager
    def _cached_attention(self) -> Iterator[None]:
        """While active, the block's attention is ``o_proj`` of its kept input, batch after batch."""
        attn = self.block.attn
        if self.attn_out is None:
            yield
            return
        kept = iter(self.attn_out)
        attn.forward = lambda *args, **kwargs: attn.o_proj(next(kept))
        try:
            yield
        finally:
            del attn.forward

    @torch.no_grad()
    def feed(self, name: str, fn: Callable[[torch.Tensor], None]) -> None:
        """Call ``fn(x)`` with every input ``x`` of the block's submodule ``name``, one batch at a time."""
        if name == "mlp.down_proj" and self.mlp_in is not None:
            def hook(_module, args):
                fn(args[0].detach())
                raise _Stop

            handle = self.block.mlp.down_proj.register_forward_pre_hook(hook)
            try:
                for x in self.mlp_in:
                    try:
                        self.block.mlp(x)
                    except _Stop:
                        continue
            finally:
                handle.remove()
            return
        kept: list[torch.Tensor] = []

        def take(x: torch.Tensor) -> None:
            kept.append(x)
            fn(x)

        keep = name == "attn.o_proj" or (name in ("mlp.gate_proj", "mlp.up_proj") and self.mlp_in is None)
        with self._cached_attention():
            inputs_of(self.block, self.inputs, name, take if keep else fn)
        if name == "attn.o_proj":  # kept after the pass: during it the attention still runs in full
            self.attn_out = kept
        elif keep:
            self.mlp_in = kept

    @torch.no_grad()
    def outputs(self) -> BlockInputs:
        """The block applied to every batch (its layers as they are now): the inputs of the next block."""
        with self._cached_attention():
            return run_block(self.block, self.inputs)


def block_linears(block: nn.Module) -> list[list[str]]:
    """The linear layers of a transformer block by the order their inputs arise (``true-sequential`` GPTQ),
    in groups that read the same input: q/k/v the attention input, o the attention output, gate/up the MLP
    input, down the MLP's product."""
    groups = [["attn.q_proj", "attn.k_proj", "attn.v_proj"], ["attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    present = []
    for group in groups:
        names = [n for n in group if isinstance(_get(block, n), nn.Linear)]
        if names:
            present.append(names)
    return present


def _get(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None
