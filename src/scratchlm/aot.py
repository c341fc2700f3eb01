"""The static decode step compiled ahead of time: an AOTInductor package per shape, loaded without the compiler.

``torch.compile`` (dynamo + inductor) compiles the step on first use, and even with inductor's disk cache every
new process re-traces it with dynamo (seconds) and keeps the compiler imported (+116 MiB). AOTInductor splits
the two: ``torch.export`` captures the step once as a graph, inductor turns it into a shared library, and
``aoti_compile_and_package`` stores that library in a ``.pt2`` zip. A later process opens the zip with
PyTorch's C++ loader (``torch._C._aoti.AOTIModelPackageLoader``), which imports neither dynamo nor inductor,
and calls the library directly: no tracing, no guards, no Python per operation.

    package = build_package(model, tokens, positions, k, v, path)   # minutes, once per machine and shape
    step = load_step(path, model)                                    # milliseconds
    logits = step(tokens, positions, k, v)                           # writes the new keys/values into k, v

Three details make the package lean and correct:

- weights are not in the package (``aot_inductor.package_constants_in_so=False``): ``load_step`` hands the
  library the model's own tensors (``load_constants(..., user_managed=True)`` keeps the pointers, no copy);
- the RoPE tables are buffers of ``StaticStep`` (a wrapper we own), so they are named constants like the
  weights, not anonymous tensors captured by the trace;
- inductor's CPU lowering of ``_weight_int4pack_mm_for_cpu`` turns the group size into an anonymous int64
  scalar constant (``torch/_inductor/quantized_lowerings.py``); ``load_step`` supplies it, which requires one
  int4 group size per model (``quantize_model`` and GGUF loads give one).

The KV cache is an input that the graph mutates in place (``torch.export`` records it; AOTInductor writes
through the input's pointer). A package is specialised on the shapes and strides of its inputs, so the caller
keys packages by them (``scratchlm.compiled``), and checks each first call against the eager step.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from scratchlm.files import atomic_file


class StaticStep(nn.Module):
    """``scratchlm.compiled.static_step`` as a module for ``torch.export``: the model is a submodule (its
    weights become named constants ``model.<name>``) and the RoPE tables are buffers ``rope_cos``/``rope_sin``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.rope = model.config.positions != "learned"
        if self.rope:
            cos, sin = model.rope("cpu")
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, k: list[torch.Tensor],
                v: list[torch.Tensor]) -> torch.Tensor:
        from scratchlm.compiled import static_step

        rope = (self.rope_cos, self.rope_sin) if self.rope else None
        return static_step(self.model, tokens, positions, k, v, rope)


def _like(t: torch.Tensor) -> torch.Tensor:
    """A normal (not inference-mode) tensor with ``t``'s shape, strides and values, for tracing."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def build_package(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, k: list[torch.Tensor],
                  v: list[torch.Tensor], path: Path) -> Path:
    """Export the static step for these inputs' shapes and strides and compile it into the package ``path``.

    The package holds code only (no weights); it is written under a temporary name and renamed into place, so
    two processes building the same package at once each leave a whole file. Imports the compiler (once per
    machine and shape: tens of seconds to minutes on a small CPU)."""
    import torch._inductor

    # Inference-mode tensors cannot be traced (the cache may have been made under inference_mode): copies.
    with torch.inference_mode(False), torch.no_grad():
        example = (_like(tokens), _like(positions), [_like(t) for t in k], [_like(t) for t in v])
        program = torch.export.export(StaticStep(model).eval(), example, strict=False)
        with atomic_file(path, force=True) as tmp:
            built = tmp.with_name(tmp.name + ".pt2")  # aoti_compile_and_package wants a .pt2 name
            try:
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(built),
                    inductor_configs={"aot_inductor.package_constants_in_so": False})
                os.replace(built, tmp)
            finally:
                built.unlink(missing_ok=True)
    return path


class AOTStep:
    """A loaded package: ``step(tokens, positions, k, v) -> logits``, running on the model's own weights."""

    def __init__(self, loader, constants: dict[str, torch.Tensor]):
        self.loader = loader
        self.constants = constants  # the library keeps raw pointers to these (user-managed): keep them alive

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, k: list[torch.Tensor],
                 v: list[torch.Tensor]) -> torch.Tensor:
        (logits,) = self.loader.boxed_run([tokens, positions, *k, *v])
        return logits


def int4_group_size(model: nn.Module) -> int | None:
    """The one group size of the model's int4 kernel layers (None: none); ValueError if they differ."""
    groups = {m.kernel_group for m in model.modules() if getattr(m, "use_kernel", False) and hasattr(m, "packed")}
    if len(groups) > 1:
        raise ValueError(f"int4 layers with different group sizes {sorted(groups)}: the package needs one")
    return groups.pop() if groups else None


def load_step(path: Path, model: nn.Module) -> AOTStep:
    """Open the package ``path`` with the C++ loader (no dynamo, no inductor) and give it ``model``'s tensors.

    Raises (RuntimeError, ValueError, ...) on a damaged package or one that needs constants the model lacks."""
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    wrapper = StaticStep(model)
    named = dict(wrapper.named_parameters(remove_duplicate=False)) | dict(wrapper.named_buffers(remove_duplicate=False))
    constants = {}
    for name in loader.get_constant_fqns():
        if name in named:
            constants[name] = named[name].detach()
        elif name.startswith("constant"):  # anonymous: the int4 lowering's group size (see the module docstring)
            group = int4_group_size(model)
            if group is None:
                raise ValueError(f"the package needs an unnamed constant {name!r} and the model has no int4 layers")
            constants[name] = torch.tensor(group, dtype=torch.int64)
        else:
            raise ValueError(f"the package needs a constant {name!r} that the model does not have")
    loader.load_constants(constants, False, True, True, False)  # use_inactive, check_full_update, user_managed, h2d
    return AOTStep(loader, constants)
