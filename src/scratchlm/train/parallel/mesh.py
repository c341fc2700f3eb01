"""How the processes are arranged: the parallel mode, the mesh shape, and the checks that it fits.

    config = ParallelConfig(mode="fsdp+tp", tp=2)          # 4 processes: 2 data-parallel x 2 tensor-parallel
    config.check(world_size=4, model_config=cfg)           # a ConfigError saying what does not divide
    mesh = build_mesh(config, world_size=4, device="cpu")  # DeviceMesh with dims ("dp", "tp")

Modes (``--parallel``), each PyTorch's own engine:

    dp       DistributedDataParallel: every process holds the whole model and optimizer (today's default)
    zero1    DDP plus ZeroRedundancyOptimizer: optimizer states sharded over the processes (ZeRO stage 1)
    fsdp     FSDP2 ``fully_shard`` per block: parameters, gradients and optimizer states sharded (ZeRO stage 3)
    tp       Megatron tensor parallelism through DTensor ``parallelize_module``; ``--tp`` ranks split each
             matrix, the rest (world / tp) are data-parallel replicas
    pp       ``torch.distributed.pipelining``: ``--pp`` stages of consecutive blocks, GPipe or 1F1B schedule; the
             rest data-parallel
    fsdp+tp  2-D: FSDP over the "dp" dimension of the mesh, tensor parallelism over "tp" (torchtitan's layout)

The mesh is (dp, tp) or (dp, pp) with tp or pp innermost, so the ranks that talk most (a tensor-parallel
group) are neighbours, as Megatron-LM orders them (Shoeybi et al. 2019, section 3; Narayanan et al. 2021).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from scratchlm.config import ModelConfig
from scratchlm.errors import ConfigError, UnsupportedError

MODES = ("dp", "zero1", "fsdp", "tp", "pp", "fsdp+tp")
SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class ParallelConfig:
    """A parallel layout. ``tp``/``pp`` of None mean "every process" for the modes that use them."""

    mode: str = "dp"
    tp: int | None = None
    pp: int | None = None
    schedule: str = "1f1b"  # pipeline schedule: gpipe (all forwards, then all backwards) or 1f1b
    microbatches: int | None = None  # pipeline micro-batches per step; None: 2 per stage
    cpu_offload: bool = False  # fsdp: keep sharded parameters, gradients and optimizer states in CPU memory

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown --parallel {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown --pp-schedule {self.schedule!r}; choose gpipe or 1f1b")
        for name in ("tp", "pp", "microbatches"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
        if self.tp not in (None, 1) and self.mode not in ("tp", "fsdp+tp"):
            raise ConfigError(f"--tp {self.tp} needs --parallel tp or fsdp+tp (got --parallel {self.mode})")
        if self.pp not in (None, 1) and self.mode != "pp":
            raise ConfigError(f"--pp {self.pp} needs --parallel pp (got --parallel {self.mode})")
        if self.cpu_offload and self.mode not in ("fsdp", "fsdp+tp"):
            raise ConfigError(f"--cpu-offload shards into CPU memory with FSDP: it needs --parallel fsdp or fsdp+tp "
                              f"(got --parallel {self.mode})")

    def to_dict(self) -> dict:
        return asdict(self)

    def shape(self, world_size: int) -> dict[str, int]:
        """The mesh dimensions for ``world_size`` processes: {"dp": n} or {"dp": n, "tp"|"pp": m}."""
        if self.mode in ("tp", "fsdp+tp"):
            inner, name = self.tp or (world_size if self.mode == "tp" else 2), "tp"
        elif self.mode == "pp":
            inner, name = self.pp or world_size, "pp"
        else:
            return {"dp": world_size}
        if world_size % inner:
            raise ConfigError(f"world size {world_size} does not factor into --{name} {inner} x data-parallel: "
                              f"start a multiple of {inner} processes (torchrun --nproc_per_node) or change --{name}")
        return {"dp": world_size // inner, name: inner}

    def check(self, world_size: int, model_config: ModelConfig, batch_size: int) -> dict[str, int]:
        """The mesh shape, after checking that the model and batch divide over it (ConfigError otherwise)."""
        shape = self.shape(world_size)
        tp, pp, dp = shape.get("tp", 1), shape.get("pp", 1), shape["dp"]
        if tp > 1:
            for what, n in (("n_heads", model_config.n_heads), ("n_kv_heads", model_config.n_kv_heads),
                            ("d_ff", model_config.d_ff)):
                if n % tp:
                    raise ConfigError(f"tensor parallelism splits {what} ({n}) over --tp {tp} ranks, which does not "
                                      f"divide it: choose --tp among the divisors of {n}")
        if pp > 1:
            if model_config.n_layers % pp:
                raise ConfigError(f"pipeline parallelism gives each of the --pp {pp} stages the same number of "
                                  f"blocks, but {model_config.n_layers} layers do not divide by {pp}: choose --pp "
                                  f"among the divisors of {model_config.n_layers}")
            if not model_config.causal or model_config.norm_position != "pre" or model_config.type_vocab_size:
                raise UnsupportedError("--parallel pp splits decoder-only (causal, pre-norm) models; this one is an "
                                       "encoder: use --parallel fsdp or tp")
        if batch_size % dp:
            raise ConfigError(f"--batch-size {batch_size} does not divide over {dp} data-parallel replicas: choose a "
                              f"multiple of {dp}")
        if pp > 1:
            per_replica = batch_size // dp
            if per_replica % self.n_microbatches(pp):
                raise ConfigError(f"each pipeline step splits {per_replica} sequences into {self.n_microbatches(pp)} "
                                  "micro-batches, which does not divide: set --microbatches to a divisor of it or "
                                  "change --batch-size")
            if self.schedule == "1f1b" and self.n_microbatches(pp) < pp:  # its warm-up fills every stage first
                raise ConfigError(f"the 1F1B schedule needs at least as many micro-batches as stages ({pp}), got "
                                  f"--microbatches {self.n_microbatches(pp)}: raise it or use --pp-schedule gpipe")
        return shape

    def n_microbatches(self, pp: int) -> int:
        return self.microbatches or 2 * pp


def check_backend(device: str) -> None:
    """Raise an UnsupportedError when the process-group backend for ``device`` is not built into torch."""
    import torch.distributed as dist

    if not dist.is_available():
        raise UnsupportedError("this PyTorch build has no torch.distributed: install a standard torch wheel")
    if device.startswith("cuda"):
        if not dist.is_nccl_available():
            raise UnsupportedError("training on CUDA devices needs the NCCL backend, which this torch lacks: install "
                                   "a CUDA build of torch, or train on CPU processes with --device cpu (gloo)")
    elif not dist.is_gloo_available():
        raise UnsupportedError("training on CPU processes needs the gloo backend, which this torch lacks")


def build_mesh(shape: dict[str, int], device: str):
    """A DeviceMesh of ``shape`` ({"dp": 2, "tp": 2}) over the processes of the default group."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cuda" if device.startswith("cuda") else "cpu", tuple(shape.values()),
                            mesh_dim_names=tuple(shape))


def add_parallel_flags(parser) -> None:
    """The ``--parallel`` flags of ``scratchlm train`` and ``finetune`` (an argparse parser)."""
    g = parser.add_argument_group("parallelism (under torchrun; docs/distributed-training.md)")
    g.add_argument("--parallel", choices=MODES, default=None,
                   help="dp (DDP, the default under torchrun), zero1 (sharded optimizer states), fsdp (FSDP2: sharded "
                        "parameters, gradients, optimizer), tp (tensor parallel), pp (pipeline), fsdp+tp (2-D)")
    g.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel ranks (tp: all; fsdp+tp: 2); the rest data-parallel")
    g.add_argument("--pp", type=int, default=None, help="pipeline stages (default: every process); rest data-parallel")
    g.add_argument("--pp-schedule", choices=SCHEDULES, default="1f1b", help="pipeline schedule (default 1f1b)")
    g.add_argument("--microbatches", type=int, default=None, help="pipeline micro-batches per step (default 2 x --pp)")
    g.add_argument("--cpu-offload", action="store_true", help="fsdp: keep sharded states in CPU memory")
    g.add_argument("--dist-timeout", type=float, default=None,
                   help="seconds a process waits for the others before the job fails (default 300)")


def parallel_from_args(args) -> ParallelConfig | None:
    """The ParallelConfig the flags ask for, or None (plain DDP) when none of them is given."""
    given = (args.parallel, args.tp, args.pp, args.microbatches)
    if all(v is None for v in given) and not args.cpu_offload and args.pp_schedule == "1f1b":
        return None
    # A flag that only one mode takes implies it: --tp 2 alone means --parallel tp, --pp 2 means pp.
    mode = args.parallel or ("tp" if args.tp else "pp" if args.pp or args.microbatches or args.pp_schedule != "1f1b"
                             else "fsdp" if args.cpu_offload else "dp")
    return ParallelConfig(mode=mode, tp=args.tp, pp=args.pp, schedule=args.pp_schedule,
                          microbatches=args.microbatches, cpu_offload=args.cpu_offload)


# ---- the layout a run records (run.json) and how a resume picks its own ------------------------------------------
def layout_record(parallel: ParallelConfig | None, world_size: int) -> dict:
    """How a run is laid out, as ``run.json`` keeps it: the world size and the parallel config (None: DDP)."""
    return {"world_size": world_size, "parallel": parallel.to_dict() if parallel is not None else None}


def describe_layout(layout: dict) -> str:
    """``"fsdp over 2 processes"``, ``"one process"``, ``"tp (tp=2) over 4 processes"``."""
    n, parallel = layout.get("world_size", 1), layout.get("parallel")
    if parallel is None:
        return "one process" if n == 1 else f"dp over {n} processes"
    extra = [f"{k}={parallel[k]}" for k in ("tp", "pp", "microbatches") if parallel.get(k) is not None]
    if parallel.get("mode") == "pp":
        extra.append(f"schedule {parallel['schedule']}")
    if parallel.get("cpu_offload"):
        extra.append("cpu offload")
    details = f" ({', '.join(extra)})" if extra else ""
    return f"{parallel['mode']}{details} over {n} process{'es' if n != 1 else ''}"


def parallel_config(layout: dict) -> ParallelConfig | None:
    """The ParallelConfig of a recorded layout (None: plain DDP or one process)."""
    return ParallelConfig(**layout["parallel"]) if layout.get("parallel") is not None else None


def resume_layout(recorded: dict | None, given: ParallelConfig | None, world_size: int,
                  say=print) -> ParallelConfig | None:
    """The layout of a resumed run: the flags given, else (under torchrun) the recorded mode; says when it changed.

    A checkpoint reads into another layout (``dcp_checkpoint.py``), so a change is allowed, and said, since it changes
    the speed and memory of the run and, for a world size change, the random streams of dropout.
    """
    chosen = given
    if given is None and world_size > 1 and recorded and recorded.get("parallel") is not None:
        chosen = parallel_config(recorded)
        say(f"parallel: {chosen.mode} as recorded in run.json (give --parallel to choose another)")
    if recorded is not None and recorded != layout_record(chosen, world_size):
        say(f"layout changed: saved by {describe_layout(recorded)}, resumed on "
            f"{describe_layout(layout_record(chosen, world_size))}; the checkpoint is read into the new layout")
    return chosen
