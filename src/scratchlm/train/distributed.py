"""Several processes, one model: PyTorch DistributedDataParallel under ``torchrun``.

    torchrun --nproc_per_node 2 -m scratchlm.cli train --preset shakespeare-char

``torchrun`` starts the processes and sets RANK, LOCAL_RANK and WORLD_SIZE; ``init_distributed`` reads
them, joins the process group (gloo on CPU, NCCL on GPU) and picks the device. Each process computes
gradients on its slice of the global batch; DDP averages them with an all-reduce during backward, so
every process applies the same update. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """True for the one process that writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


DEFAULT_TIMEOUT = 300.0  # seconds a collective waits for a missing process before failing (torch's default: 30 min)


def init_distributed(device: str = "auto", timeout: float | None = None) -> Dist:
    """Join the process group when started by torchrun; a single-process Dist otherwise.

    Args:
        device: "cpu", "cuda" or "auto" (CUDA when available).
        timeout: seconds any collective may wait for the others; a dead or stuck process then ends the job with an
            error instead of a hang (None: DEFAULT_TIMEOUT).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or "RANK" not in os.environ:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        from scratchlm.train.parallel.mesh import check_backend

        check_backend(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                                timeout=timedelta(seconds=timeout or DEFAULT_TIMEOUT))
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def shutdown(d: Dist) -> None:
    """Leave the process group (a no-op for a single process)."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: str = "auto", timeout: float | None = None) -> Iterator[Dist]:
    """This process's ``Dist`` for the length of a training run (``train``, ``finetune``), as ``init_distributed``.

    A peer that never comes to the rendezvous, dies or hangs makes gloo and NCCL raise RuntimeErrors with their
    own long messages; here they become one-line ``TrainingError``s that say what to do. The process group is
    left at the end when this call joined it (a caller that joined it already keeps it, as the tests' workers do).
    """
    from scratchlm.errors import TrainingError

    joined = not (dist.is_available() and dist.is_initialized())
    try:
        d = init_distributed(device, timeout)
    except RuntimeError as exc:  # the others did not come to the rendezvous within the timeout
        if not peer_failure(exc):
            raise
        raise TrainingError(f"could not connect to the other processes ({str(exc).splitlines()[0][:200]}); check "
                            "that every node started, or raise --dist-timeout") from None
    try:
        yield d
    except RuntimeError as exc:  # a peer died or hung: gloo/NCCL timed out or lost the connection
        if not (d.enabled and peer_failure(exc)):
            raise
        raise TrainingError(f"process {d.rank} of {d.world_size}: a collective failed "
                            f"({str(exc).splitlines()[0][:200]}); another process probably died or hangs, see its "
                            "log; resume with --resume from the last checkpoint") from None
    finally:
        if joined:
            shutdown(d)


@contextmanager
def main_process_first(d: Dist, what: str = "training") -> Iterator[None]:
    """Around what rank 0 alone does before a run (clearing the output directory, preparing data): every process
    learns afterwards whether it failed (a collective, like a barrier), so that all of them stop with rank 0's
    one-line message instead of the others waiting for it in a collective or failing with a broken connection."""
    from scratchlm.errors import ScratchLMError, TrainingError

    failure = None
    try:
        yield
    except ScratchLMError as exc:
        failure = exc
    if broadcast_flag(d, failure is not None):
        raise failure or TrainingError(f"process 0 stopped before {what}; its message says why")


def peer_failure(exc: BaseException) -> bool:
    """Whether a collective failed because another process died or stopped answering (gloo, NCCL messages)."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(
        mark in text for mark in ("Timed out", "timed out", "Connection closed", "Connection reset", "NCCL error",
                                  "Broken pipe"))


def barrier(d: Dist) -> None:
    """Wait until every process gets here (rank 0 preparing data, the others waiting to read it)."""
    if d.enabled:
        dist.barrier()


def all_reduce_sum(d: Dist, *values: float) -> list[float]:
    """Element-wise sums of a few numbers over all processes."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_flag(d: Dist, flag: bool) -> bool:
    """Rank 0's value of ``flag`` on every process (so all of them stop together)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=d.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def gather_json(d: Dist, obj) -> list:
    """Every process's JSON-serialisable ``obj``, in rank order (on every rank).

    Sent as UTF-8 bytes in a padded uint8 tensor, so nothing is pickled (``all_gather_object`` would).
    """
    if not d.enabled:
        return [obj]
    data = torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8, device=d.device)
    length = torch.tensor([data.numel()], dtype=torch.int64, device=d.device)
    lengths = [torch.zeros_like(length) for _ in range(d.world_size)]
    dist.all_gather(lengths, length)
    longest = int(max(n.item() for n in lengths))
    padded = torch.zeros(longest, dtype=torch.uint8, device=d.device)
    padded[: data.numel()] = data
    chunks = [torch.zeros_like(padded) for _ in range(d.world_size)]
    dist.all_gather(chunks, padded)
    return [json.loads(bytes(c[: int(n.item())].tolist()).decode("utf-8")) for c, n in zip(chunks, lengths)]
