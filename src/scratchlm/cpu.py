"""CPU defaults that let two scratchlm processes share a small machine (training in one terminal, chat in another).

PyTorch's CPU wheels run their parallel loops on GNU OpenMP (libgomp). When a parallel region ends, its threads
do not sleep: they spin, waiting for the next region, for about 300,000 iterations (libgomp's ``GOMP_SPINCOUNT``
when ``OMP_WAIT_POLICY`` is unset; it throttles only when one process has more threads than CPUs). One process
alone gains a little from that. Two processes, each sized to the whole machine, lose a lot: the spinning threads
of one hold the cores that the other's threads need to finish their region, and training on 2 cores fell from
about 28 steps/s to one step every 3-4 s while a chat generated (``benchmarks/cpu_sharing.py``).

So the CLI, before anything imports torch:

- sets ``GOMP_SPINCOUNT=1000`` (idle threads spin briefly, then sleep), unless the user set it or
  ``OMP_WAIT_POLICY``. Measured on 2 idle cores (``benchmarks/cpu_sharing.py``, RESULTS.md 2026-12-01): training
  alone 1.04-1.09x torch's defaults, training beside a chat 1.3-2.6x faster and the chat 3x faster. The
  ``OMP_WAIT_POLICY=PASSIVE`` tried first shared slightly better (13.9 against 11.0 steps/s beside the chat) but
  cost a training job alone 20-30% (a small model's many short parallel regions each wake sleeping threads);
- chooses the thread count from the CPUs that are free now: the CPUs this process may run on, less those busy
  with other work over the last 0.1 s (``/proc/stat``), at least one. ``--threads`` or ``OMP_NUM_THREADS`` win.

libgomp reads its environment once, when it loads, so these must be set before ``import torch``: ``scratchlm``'s
package and CLI modules import torch only inside the functions that need it.
"""

from __future__ import annotations

import os
import sys
import time

WAIT_POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _affinity() -> set[int] | None:
    """The CPUs this process may run on (its affinity mask, which taskset and containers narrow), or None."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def usable_cpus() -> int:
    """How many CPUs this process may run on."""
    cpus = _affinity()
    return len(cpus) if cpus else (os.cpu_count() or 1)


def _cpu_times(cpus: set[int] | None) -> dict[int, tuple[float, float]] | None:
    """{cpu: (busy, total)} jiffies since boot of the given CPUs (all when None), from /proc/stat (Linux only)."""
    times = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *values = line.split()
                if not name.startswith("cpu") or name == "cpu":
                    continue
                cpu = int(name[3:])
                if cpus is None or cpu in cpus:
                    fields = [float(x) for x in values]
                    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
                    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
                    times[cpu] = (total - idle, total)
    except (OSError, ValueError):
        return None
    return times or None


def busy_cpus(window: float = 0.1) -> float:
    """How many of this process's CPUs other work kept busy over the last ``window`` seconds (0.0 where it cannot
    be measured). Only the CPUs in the affinity mask count: a container on a busy host is not busy itself."""
    cpus = _affinity()
    first = _cpu_times(cpus)
    if first is None:
        return 0.0
    time.sleep(window)
    second = _cpu_times(cpus)
    if second is None:
        return 0.0
    busy = 0.0
    for cpu, (busy0, total0) in first.items():
        busy1, total1 = second.get(cpu, (busy0, total0))
        if total1 > total0:
            busy += (busy1 - busy0) / (total1 - total0)
    return busy


def free_cpus(window: float = 0.1) -> int:
    """Usable CPUs less the ones busy with other work (a CPU counts as busy from half a CPU's load), at least 1."""
    return max(1, usable_cpus() - int(busy_cpus(window) + 0.5))


SPIN_COUNT = "1000"  # libgomp's default is 300,000 spins before a waiting thread sleeps


def set_wait_policy(environ=os.environ) -> bool:
    """``GOMP_SPINCOUNT=1000`` unless the user chose a policy; True when set. Call before torch loads."""
    if any(name in environ for name in WAIT_POLICY_VARS):
        return False
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


def choose_threads(explicit: int | None = None, environ=os.environ) -> int | None:
    """The thread count to use: ``explicit`` (``--threads``), else None when ``OMP_NUM_THREADS`` is set (torch
    reads it itself), else the CPUs free now (``free_cpus``)."""
    if explicit is not None:
        return explicit
    if "OMP_NUM_THREADS" in environ:
        return None
    return free_cpus()


def set_threads(threads: int, environ=os.environ) -> None:
    """Use ``threads`` CPU threads: through the environment when torch has not loaded yet, else directly."""
    environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
