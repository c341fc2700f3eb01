"""``scratchlm prune``: load a model, prune it, write it as a model directory with a ``pruning.json`` report.

    result = prune_to_directory("smollm2-135m-instruct", "runs/sparse", method="wanda", sparsity=0.5,
                                calibration="corpus.txt")
    result = prune_to_directory("smollm2-135m-instruct", "runs/small", method="structured", heads=0.34, mlp=0.4)

The directory loads with ``LLM.load`` and every command (chat, eval, export, quantize, finetune, distill):
unstructured pruning keeps the shapes and stores the zeros; structured pruning writes the smaller
architecture (its ``model_config.json`` has the new n_heads, n_kv_heads, head_dim and d_ff).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from scratchlm.compress.prune import METHODS, LayerReport, check_sparsity, overall_sparsity, prune_model, wanda_prune
from scratchlm.errors import ConfigError

ALL_METHODS = (*METHODS, "structured")
REPORT_FILE = "pruning.json"


@dataclass
class PruneResult:
    """What ``prune_to_directory`` did: the pruned LLM, the per-layer report, parameter counts and the file."""

    llm: object
    method: str
    layers: list[LayerReport] = field(default_factory=list)  # unstructured: zeros per layer
    plan: dict | None = None  # structured: kept groups and channels per layer
    params_before: int = 0
    params_after: int = 0
    nonzero_after: int = 0
    out: Path | None = None
    seconds: float = 0.0


def check_prune_options(method: str, sparsity: float | None, structure: tuple[int, int] | None,
                        heads: float | None, mlp: float | None) -> None:
    """Refuse contradictory or out-of-range options before the slow load."""
    if method not in ALL_METHODS:
        raise ConfigError(f"unknown pruning method {method!r}; choose one of {', '.join(ALL_METHODS)}")
    if method == "structured":
        if sparsity is not None or structure is not None:
            raise ConfigError("--method structured takes --heads F and --mlp F, not --sparsity or --structure")
        from scratchlm.compress.structured import check_fraction

        if not (check_fraction(heads, "--heads") or check_fraction(mlp, "--mlp")):
            raise ConfigError("--method structured needs --heads F and/or --mlp F (fractions to remove, e.g. 0.25)")
    else:
        if heads is not None or mlp is not None:
            raise ConfigError(f"--heads and --mlp go with --method structured, not {method}")
        check_sparsity(sparsity, structure)


def prune_llm(llm, method: str, sparsity: float | None = None, structure: tuple[int, int] | None = None,
              heads: float | None = None, mlp: float | None = None, calibration: str | Path | None = None,
              samples: int | None = None, seq_len: int | None = None, progress: bool = False) -> PruneResult:
    """Prune ``llm`` (a dense LLM): in place for magnitude/Wanda, into a new smaller model for structured."""
    import torch

    from scratchlm.compress.prune import input_square_sums
    from scratchlm.llm import LLM
    from scratchlm.progress import stage

    check_prune_options(method, sparsity, structure, heads, mlp)
    model = llm.model
    before = model.num_parameters()
    result = PruneResult(llm, method, params_before=before)
    tokens = None
    if method != "magnitude":
        tokens = calibration_ids(llm, calibration, samples, seq_len, progress)
    if method == "magnitude":
        result.layers = prune_model(model, "magnitude", sparsity, structure)
    elif method == "wanda":
        result.layers = wanda_prune(model, tokens, sparsity, structure, progress=progress)
    else:
        from scratchlm.compress.structured import apply_plan, plan_structured

        sums = input_square_sums(model, tokens, names=("attn.o_proj", "mlp.down_proj"), progress=progress)
        plan = plan_structured(model.config, sums, tokens.numel(), heads, mlp)
        with stage("removing heads and channels", progress):
            small = apply_plan(model, plan)
        result.plan = {"kv_groups": plan.kv_groups, "channels": plan.channels}
        result.llm = LLM(small, llm.tokenizer, llm.template, llm.name, llm.source, llm.eos_ids)
    after = result.llm.model
    result.params_after = after.num_parameters()
    seen: set[int] = set()
    nonzero = 0
    for p in after.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            nonzero += int(torch.count_nonzero(p))
    result.nonzero_after = nonzero
    return result


def calibration_ids(llm, calibration: str | Path | None, samples: int | None, seq_len: int | None,
                    progress: bool):
    """Token windows [samples, seq_len] of the calibration text (the bundled Shakespeare when none is given)."""
    from scratchlm.progress import stage
    from scratchlm.quant.calibration import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, calibration_tokens

    if calibration is None:
        from scratchlm.train.sources import bundled_corpus

        calibration = bundled_corpus()
        if progress:
            print(f"calibrating on the bundled corpus {calibration} (give --calibration FILE for text like yours)")
    seq_len = seq_len or min(DEFAULT_SEQ_LEN, llm.config.context_length)
    if seq_len > llm.config.context_length:
        raise ConfigError(f"--seq-len {seq_len} is longer than the model's context ({llm.config.context_length})")
    with stage(f"tokenizing {calibration}", progress):
        return calibration_tokens(llm.tokenizer, calibration, samples or DEFAULT_SAMPLES, seq_len)


def prune_to_directory(model: str, out, method: str, sparsity: float | None = None,
                       structure: tuple[int, int] | None = None, heads: float | None = None, mlp: float | None = None,
                       calibration: str | Path | None = None, samples: int | None = None,
                       seq_len: int | None = None, force: bool = False, progress: bool = False) -> PruneResult:
    """Load ``model`` in float32, prune it, and write it with its tokenizer and ``pruning.json`` to ``out``."""
    from scratchlm.files import atomic_dir, atomic_write_json, check_destination
    from scratchlm.formats.checkpoint import save_model_dir
    from scratchlm.llm import LLM
    from scratchlm.progress import stage

    start = time.perf_counter()
    check_prune_options(method, sparsity, structure, heads, mlp)
    out = Path(out)
    check_destination(out, force, want_dir=True)
    with stage(f"loading {model}", progress):
        llm = LLM.load(model, dtype="float32", compile=False)
    result = prune_llm(llm, method, sparsity, structure, heads, mlp, calibration, samples, seq_len, progress)
    pruned = result.llm
    with stage(f"writing {out}", progress), atomic_dir(out, force) as tmp:
        save_model_dir(tmp, pruned.config.replace(name=out.name), pruned.model.canonical_state_dict(),
                       pruned.tokenizer, pruned.template.source)
        atomic_write_json(tmp / REPORT_FILE, report_dict(result, model, {
            "sparsity": sparsity, "structure": None if structure is None else f"{structure[0]}:{structure[1]}",
            "heads": heads, "mlp": mlp, "calibration": None if calibration is None else str(calibration),
            "samples": samples, "seq_len": seq_len}))
    result.out = out
    result.seconds = time.perf_counter() - start
    return result


def report_dict(result: PruneResult, source: str, options: dict) -> dict:
    """The JSON report written beside the weights."""
    data = {"source": str(source), "method": result.method, "options": options,
            "parameters_before": result.params_before, "parameters_after": result.params_after,
            "nonzero_parameters_after": result.nonzero_after}
    if result.layers:
        data["layer_sparsity"] = overall_sparsity(result.layers)
        data["layers"] = [r.to_dict() for r in result.layers]
    if result.plan is not None:
        cfg = result.llm.config
        data["config"] = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
                          "d_ff": cfg.d_ff}
        data["kept"] = result.plan
    return data


def summary_lines(result: PruneResult) -> list[str]:
    """What ``scratchlm prune`` prints: one line per block (sparsity of each layer), then the totals."""
    lines = []
    by_block: dict[str, list[str]] = {}
    for r in result.layers:
        block, _, rest = r.name.partition(".")[2].partition(".")
        short = rest.split(".")[-1].removesuffix("_proj")
        by_block.setdefault(block, []).append(f"{short} {100 * r.sparsity:.1f}%")
    for block, parts in by_block.items():
        lines.append(f"block {int(block):>2}: " + "  ".join(parts))
    if result.layers:
        lines.append(f"linear layers: {100 * overall_sparsity(result.layers):.1f}% zeros; whole model "
                     f"{result.nonzero_after / 1e6:.2f}M non-zero of {result.params_after / 1e6:.2f}M parameters "
                     "(embeddings and LM head stay dense)")
    if result.plan is not None:
        cfg = result.llm.config
        lines.append(f"kept per layer: {cfg.n_kv_heads} key/value group(s) = {cfg.n_heads} heads of {cfg.head_dim}, "
                     f"{cfg.d_ff} MLP channels")
        lines.append(f"parameters: {result.params_before / 1e6:.2f}M -> {result.params_after / 1e6:.2f}M "
                     f"({100 * result.params_after / result.params_before:.1f}%)")
    return lines
