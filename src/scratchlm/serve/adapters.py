"""Many LoRA adapters on one base model, in one batch: every row of a forward pass applies its own adapter.

A request names a model; the server maps it to an adapter index (0 is the base) and the engine tells the model,
before each forward pass, which index each row uses (``ServedAdapters.select``). Each adapted layer holds every
adapter's factors stacked, A [adapters, in, R] and B [adapters, R, out] (each ``alpha / r`` folded into its B,
ranks zero-padded to the largest R), and adds to the base output, for the rows of each adapter j in use,

    y[rows_j] += (x[rows_j] @ A_j) @ B_j

as two batched matrix products over the adapters in use (the segmented products of Punica's SGMV and
S-LoRA's kernels, Chen et al. 2023 and Sheng et al. 2023, written with ``torch.bmm``): the rows are grouped by
adapter (``RowSelection.plan``), gathered into [groups, rows per group, in] (padded when the groups differ in
size), multiplied, and added back into their rows. Base rows take no part, so each row does only its own
adapter's arithmetic: an earlier version multiplied every row by every adapter's factors side by side and
masked the others out, which cost 4x the work with four adapters and did not keep two threads busy (0.58x of
the base at 16 rows on 2 threads, benchmarks/RESULTS.md). Nothing is merged into the base weights and nothing is
swapped between steps, so requests for different adapters and for the base decode in one batch. Adapters of
different ranks, ranks that differ per module (PEFT's ``rank_pattern``) and adapters that leave some modules
alone (zero factors there) all fit the padded stacks. A decode step's products are a few microseconds each, so
they run on one thread (``MultiLoRALinear.forward``): as OpenMP regions over two threads their synchronisation
cost more than their work, and the adapters fell to 0.52-0.57x of the base instead of 0.8-0.9x.

The base layer can be anything with ``in_features``/``out_features`` (float, int8, int4): the update is added to
its output. When quantization fused q/k/v (and gate/up) into one product, each part's B fills its own columns
of the fused output, so a fused layer carries the parts' updates side by side.

Adapters are PEFT directories as ``scratchlm finetune`` writes them; one made for another base is refused with
the reason (different shapes, or base weights that differ from the ones it recorded).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from scratchlm.errors import ConfigError, ModelFileError
from scratchlm.finetune import peft
from scratchlm.finetune.lora import TARGETS

# Passes of up to this many tokens (decode steps, short verifications) apply the adapters on one thread; longer
# prefills are large enough products to gain from every thread.
SINGLE_THREAD_ROWS = 64
# Switching the thread count per layer relies on OpenMP's per-thread setting; PyTorch's native thread pool cannot
# change its size once it has run, so other builds keep their threads.
_OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()


class GroupPlan(NamedTuple):
    """How the rows of one forward pass ([B, T] tokens, flattened to B*T) meet the stacked factors."""

    gather: torch.Tensor  # (G * m,): the token each slot of the [G, m] layout reads (padding slots: any token)
    adapters: slice | torch.Tensor | None  # the groups' adapters in the stacks: a range (a view), indices, or None: all
    groups: int  # G: adapters in use (and any between them that no row uses)
    width: int  # m: tokens per group, the largest group's
    dest: torch.Tensor | None  # padded layouts: the real slots' tokens, in order (None: gather has no padding)
    src: torch.Tensor | None  # padded layouts: the real slots' positions in the [G * m] layout


class RowSelection:
    """Which adapter each row of the next forward pass applies; shared by every ``MultiLoRALinear``."""

    def __init__(self, adapters: int, device=None) -> None:
        self.count, self.device = adapters, device
        self.ids: list[int] = []
        self.active = False  # some row uses an adapter (else the layers skip the update)
        self._plans: dict[int, GroupPlan] = {}  # per tokens-per-row T, for the current ids

    def select(self, ids: list[int]) -> None:
        if ids != self.ids:
            self.ids, self._plans = list(ids), {}
        self.active = any(ids)

    def plan(self, tokens_per_row: int) -> GroupPlan:
        """The grouping of the current rows' tokens by adapter (built once per selection and row width)."""
        plan = self._plans.get(tokens_per_row)
        if plan is None:
            plan = self._plans[tokens_per_row] = self._build(tokens_per_row)
        return plan

    def _build(self, T: int) -> GroupPlan:
        used = sorted({a for a in self.ids if a})
        # The stacks' adapters from the first to the last in use are a view of them (no copy); adapters between
        # that no row asked for get an empty group (padding slots whose products are dropped), unless they
        # outnumber the ones in use: then copying the used factors out (an index) reads less.
        lo, hi = used[0], used[-1]
        span = list(range(lo, hi + 1)) if hi - lo + 1 <= 2 * len(used) else used
        members = {a: [b * T + t for b, a_b in enumerate(self.ids) if a_b == a for t in range(T)] for a in span}
        m = max(len(tokens) for tokens in members.values())
        gather, dest, src = [], [], []
        for g, a in enumerate(span):
            tokens = members[a]
            gather += tokens + [tokens[0] if tokens else 0] * (m - len(tokens))
            dest += tokens
            src += range(g * m, g * m + len(tokens))
        padded = len(dest) < len(gather)

        def tensor(values):
            return torch.tensor(values, dtype=torch.long, device=self.device)

        if span == list(range(1, self.count + 1)):
            stacks = None
        elif span[-1] - span[0] + 1 == len(span):
            stacks = slice(span[0] - 1, span[-1])
        else:
            stacks = tensor([a - 1 for a in span])
        return GroupPlan(tensor(gather), stacks, len(span), m, tensor(dest) if padded else None,
                         tensor(src) if padded else None)


class MultiLoRALinear(nn.Module):
    """``base`` plus, per row, the update of the adapter that row selected (see the module docstring)."""

    def __init__(self, base: nn.Module, selection: RowSelection, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base, self.selection = base, selection
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("a", a)  # (adapters, in, R): each adapter's A, transposed, rank zero-padded to R
        self.register_buffer("b", b)  # (adapters, R, out): each adapter's scaled B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.selection.active:
            return y
        threads = torch.get_num_threads()
        if threads == 1 or not _OPENMP or x.numel() > SINGLE_THREAD_ROWS * x.shape[-1]:
            return self._add_updates(x, y)
        # A decode step's products are a few microseconds of work each: split over two OpenMP threads, every
        # one of them (gather, two bmm, index_add_) becomes a parallel region whose barrier costs more than the
        # work, and far more when another process holds a core (at load 9, 5x the CPU time of one thread for a
        # bmm, 45x for index_add_; a 16-row SmolLM2 step with four adapters 0.56x the base's speed, 0.92x with
        # this: benchmarks/serve_cache.py). The base's large products keep their threads; these run on one.
        # set_num_threads sets the calling thread's OpenMP and MKL counts and costs ~0.2 us.
        torch.set_num_threads(1)
        try:
            return self._add_updates(x, y)
        finally:
            torch.set_num_threads(threads)

    def _add_updates(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the base output for ``x``) plus each selected row's own adapter update."""
        plan = self.selection.plan(x.shape[1])
        a, b = (self.a, self.b) if plan.adapters is None else (self.a[plan.adapters], self.b[plan.adapters])
        # (a slice is a view of the stacks; an index tensor copies the used adapters' factors out)
        tokens = x.reshape(-1, x.shape[-1]).index_select(0, plan.gather).to(a.dtype)
        h = torch.bmm(tokens.view(plan.groups, plan.width, -1), a)  # (G, m, R)
        update = torch.bmm(h, b).view(-1, b.shape[-1])  # (G * m, out): each group's rows through its own adapter
        if plan.src is not None:
            update = update.index_select(0, plan.src)
        flat = y.reshape(-1, y.shape[-1])
        if flat.data_ptr() != y.data_ptr() or not y.is_contiguous():
            y = y.contiguous()
            flat = y.view(-1, y.shape[-1])
        flat.index_add_(0, plan.gather if plan.dest is None else plan.dest, update.to(y.dtype))  # y[rows] += ...
        return y

    def extra_repr(self) -> str:
        return f"adapters={self.a.shape[0]}, rank={self.a.shape[2]}"


def _part_sizes(config) -> dict[str, int]:
    kv = config.n_kv_heads * config.head_dim
    return {"q": config.n_heads * config.head_dim, "k": kv, "v": kv, "o": config.d_model,
            "gate": config.d_ff, "up": config.d_ff, "down": config.d_model}


def _in_size(config, short: str) -> int:
    return {"o": config.n_heads * config.head_dim, "down": config.d_ff}.get(short, config.d_model)


def _layer_points(block: nn.Module, config) -> list[tuple[str, list[tuple[str, int]]]]:
    """(module path inside a block, [(short target, first output column)]) for every layer an adapter can
    touch: fused q/k/v and gate/up count as one layer with several parts."""
    sizes = _part_sizes(config)
    points = []
    if getattr(block.attn, "qkv_proj", None) is not None:
        points.append(("attn.qkv_proj", [("q", 0), ("k", sizes["q"]), ("v", sizes["q"] + sizes["k"])]))
    else:
        points += [(TARGETS[s], [(s, 0)]) for s in ("q", "k", "v")]
    points.append((TARGETS["o"], [("o", 0)]))
    if getattr(block.mlp, "gate_up_proj", None) is not None:
        points.append(("mlp.gate_up_proj", [("gate", 0), ("up", sizes["gate"])]))
    else:
        points += [(TARGETS[s], [(s, 0)]) for s in ("gate", "up") if hasattr(block.mlp, TARGETS[s].split(".")[1])]
    points.append((TARGETS["down"], [("down", 0)]))
    return points


# ---- is this adapter for this base? --------------------------------------------------------------------------
def _sample(model: nn.Module, name: str, positions: torch.Tensor) -> torch.Tensor:
    """Weights of canonical tensor ``name`` at flat ``positions``, whatever the layer became (quantized, fused)."""
    cfg = model.config
    path = name.rsplit(".", 1)[0]
    parent, _, leaf = path.rpartition(".")
    module, rows = model.get_submodule(parent)._modules.get(leaf), None
    if module is None:  # q/k/v or gate/up fused into one quantized layer: that part's rows of it
        short = leaf.removesuffix("_proj")
        block = model.get_submodule(parent.rpartition(".")[0])
        point, offset = next((p, o) for p, parts in _layer_points(block, cfg) for s, o in parts if s == short)
        module, rows = block.get_submodule(point), (offset, offset + _part_sizes(cfg)[short])
    if isinstance(module, MultiLoRALinear):
        module = module.base
    if isinstance(module, (nn.Linear, nn.Embedding)):
        weight = module.weight.detach().float()
    elif hasattr(module, "dequantized"):  # int8 / int4 linear layers
        weight = module.dequantized(torch.float32)
    else:  # a quantized embedding: look up only the rows the positions fall in
        width = module.embedding_dim
        return module(positions // width).float()[torch.arange(len(positions)), positions % width]
    if rows is not None:
        weight = weight[rows[0]: rows[1]]
    return weight.reshape(-1)[positions]


def check_base(saved: dict, model: nn.Module, adapter_dir: Path) -> None:
    """Raise a ModelFileError unless ``model`` is the base the adapter recorded (``peft.check_same_base``, for a
    base that may be quantized or fused)."""
    now = peft.architecture(model.config)
    diffs = [f"{k} {saved['architecture'].get(k)!r} vs {v!r}" for k, v in now.items()
             if saved["architecture"].get(k) != v]
    if diffs:
        raise ModelFileError(f"adapter {adapter_dir} was made for a different base model ({'; '.join(diffs)} in the "
                             "adapter vs this model): serve it with the model it was trained from")
    ref, current = [], []
    for pattern in peft.SAMPLE_TENSORS:
        name = pattern.format(last=model.config.n_layers - 1)
        if name not in saved["sample"]:
            continue
        numel = math.prod(_shape(model.config, name))
        positions = torch.randint(0, numel, (peft.SAMPLE_SIZE,), generator=torch.Generator().manual_seed(0))
        ref += saved["sample"][name]
        current += _sample(model, name, positions).tolist()
    if not ref:
        return
    ref_t, now_t = torch.tensor(ref), torch.tensor(current)
    distance = ((now_t - ref_t).norm() / ref_t.norm().clamp(min=1e-12)).item()
    if distance > peft.SAME_BASE_TOLERANCE:
        raise ModelFileError(f"adapter {adapter_dir} was made for a different base model: the base weights it "
                             f"recorded differ from this model's by {distance:.0%} (same-model copies differ by "
                             f"under {peft.SAME_BASE_TOLERANCE:.0%}); serve it with the model it was trained from")


def _shape(config, name: str) -> tuple[int, int]:
    if name.startswith("tok_embeddings"):
        return config.vocab_size, config.d_model
    short = next(s for s, p in TARGETS.items() if f".{p}." in name)
    return _part_sizes(config)[short], _in_size(config, short)


# ---- loading -------------------------------------------------------------------------------------------------
def _read(model: nn.Module, directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{canonical module: (A [r, in], scaled B [out, r])} of one adapter, checked against ``model``."""
    cfg = model.config
    peft.check_peft_layout(cfg)
    config, pairs, fingerprint = peft.read_adapter(directory)
    if fingerprint is not None:
        check_base(fingerprint, model, directory)
    alpha, rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora", False))
    out = {}
    for name, (a, b) in pairs.items():
        index, short = int(name.split(".")[1]), next(s for s, p in TARGETS.items() if name.endswith(p))
        expected = (_part_sizes(cfg)[short], _in_size(cfg, short))
        rank = a.shape[0]
        if index >= cfg.n_layers or a.ndim != 2 or b.ndim != 2 or b.shape[1] != rank or \
                (b.shape[0], a.shape[1]) != expected:
            raise ModelFileError(
                f"adapter {directory} was made for a different base model: {peft.hf_module_name(name)} has A "
                f"{list(a.shape)} and B {list(b.shape)}, this model's layer is {list(expected)} in "
                f"{cfg.n_layers} layers")
        scaling = alpha / (math.sqrt(rank) if rslora else rank)  # each module's own rank (rank_pattern)
        out[name] = (a.float(), b.float() * scaling)
    return out


class ServedAdapters:
    """The adapters a server applies per request, attached to its base model as ``MultiLoRALinear`` layers.

    ``names[0]`` is the base model's name; adapter ``i`` is ``names[i]``.
    """

    def __init__(self, model: nn.Module, adapters: dict[str, str | Path], base_name: str):
        self.names = [base_name, *adapters]
        self.sources = {name: Path(path) for name, path in adapters.items()}
        if base_name in adapters:
            raise ConfigError(f"adapter name {base_name!r} is the base model's name: choose another")
        factors = [_read(model, Path(path)) for path in adapters.values()]
        weight = next(p for p in model.parameters() if p.is_floating_point())
        dtype, device = weight.dtype, weight.device
        self.selection = RowSelection(len(factors), device)
        for i, block in enumerate(model.blocks):
            for path, parts in _layer_points(block, model.config):
                base = block.get_submodule(path)
                per_adapter = []  # each adapter's (A^T [in, R_j], B [R_j, out]) for this layer, or None
                for f in factors:
                    a_cols, b_rows = [], []
                    for short, offset in parts:  # each part: its own rank columns, its own output columns
                        if f"blocks.{i}.{TARGETS[short]}" not in f:
                            continue
                        a, scaled_b = f[f"blocks.{i}.{TARGETS[short]}"]
                        rows = torch.zeros(a.shape[0], base.out_features)
                        rows[:, offset: offset + scaled_b.shape[0]] = scaled_b.T
                        a_cols.append(a.T)
                        b_rows.append(rows)
                    per_adapter.append((torch.cat(a_cols, 1), torch.cat(b_rows)) if a_cols else None)
                if all(p is None for p in per_adapter):
                    continue
                rank = max(p[0].shape[1] for p in per_adapter if p is not None)
                a_stack = torch.zeros(len(factors), base.in_features, rank)
                b_stack = torch.zeros(len(factors), rank, base.out_features)
                for j, p in enumerate(per_adapter):
                    if p is not None:  # zero padding: the extra rank columns add exact zeros
                        a_stack[j, :, : p[0].shape[1]] = p[0]
                        b_stack[j, : p[1].shape[0]] = p[1]
                parent, _, attr = path.rpartition(".")
                layer = MultiLoRALinear(base, self.selection, a_stack.to(device, dtype), b_stack.to(device, dtype))
                setattr(block.get_submodule(parent), attr, layer)

    def index(self, name: str) -> int | None:
        """The adapter index of a served model name (0 for the base), None when it is not served."""
        try:
            return self.names.index(name)
        except ValueError:
            return None

    def select(self, ids: list[int]) -> None:
        """Rows of the next forward pass apply these adapters (a list as long as its batch)."""
        self.selection.select(ids)


def parse_adapter_specs(values: list[str]) -> tuple[dict[str, str], str | None]:
    """``--adapter`` values -> ({name: directory} served beside the base, one directory merged into it or None).

    ``NAME=DIR`` serves an adapter under NAME; a bare ``DIR`` is merged into the base at load, as in
    ``generate`` and ``chat``.
    """
    served: dict[str, str] = {}
    merged = None
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or Path(value).exists():
            if merged is not None:
                raise ConfigError("only one --adapter DIR can be merged into the base; serve the others side by "
                                  "side as --adapter NAME=DIR")
            merged = value
            continue
        if not name or not directory:
            raise ConfigError(f"--adapter {value!r}: write NAME=DIR (a name for clients, a LoRA adapter directory)")
        if name in served:
            raise ConfigError(f"--adapter: the name {name!r} is given twice")
        if not peft.is_adapter_dir(directory):
            raise ConfigError(f"--adapter {value}: {directory} is not a LoRA adapter directory "
                              f"({peft.CONFIG_FILE} is missing)")
        served[name] = directory
    return served, merged
