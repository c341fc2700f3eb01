"""Building the AOT decode-step packages in a background process, so that nobody waits for the compiler.

The first run of a model on a machine has no package for its decode step (``scratchlm.aot``), and building one
takes minutes of CPU. Instead of making that run (or a server's first requests) wait, the decoder asks for the
package here and decodes eagerly meanwhile; a detached, niced worker process builds it into the model's compile
directory (``scratchlm.compile_cache``); the next process, or the same one a moment later (the decoder looks
again about once a second), loads it in milliseconds.

    $SCRATCHLM_HOME/compile/<key>/
        requests/<package>.json    what the worker is asked to build: the cache layout and how to load the model
        build.lock                 held by the one worker of this directory while it runs
        <package>.failed           the worker could not build it (one line); nobody asks again for this key
        build.log                  the worker's stderr (tracebacks of failed builds)

The worker reloads the model from its source (``LLM.load`` with the same options, kept in the request): the
package holds no weights, only code specialised on the model's shapes, so it checks that the reloaded model has
the same compile key before it builds. One worker per directory at a time (``build.lock``); it builds every
request it finds, one after another, then exits. Each package is still written under its own lock and renamed
into place (``aot.build_package``), so a foreground build (``--compile``) and a worker never collide, and the
first call that loads it checks it against the eager step as always.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from scratchlm.files import atomic_write_bytes, atomic_write_json, read_json

REQUESTS = "requests"
LOCK = "build.lock"
LOG = "build.log"
# The worker yields the CPU to the process that is decoding (and to everything else): its niceness is raised by
# this much over its parent's. $SCRATCHLM_BUILD_NICE overrides it (the tests wait for a build: 0 there).
NICE = 10


def failed_marker(package: Path) -> Path:
    return package.with_name(package.name + ".failed")


def failure(package: Path) -> str | None:
    """The one-line reason why the worker could not build ``package`` (None: it has not failed)."""
    marker = failed_marker(package)
    try:
        return marker.read_text(encoding="utf-8").strip() or "unknown error"
    except OSError:
        return None


def building(directory: Path) -> bool:
    """Whether a worker holds ``directory``'s build lock now."""
    try:
        with open(directory / LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def request(package: Path, spec: dict) -> subprocess.Popen | None:
    """Ask for ``package`` (a path in a compile directory) to be built from ``spec``: its ``layout``, the example
    cache (``shape``, ``stride``, ``dtype``, ``n_layers``), the ``threads`` and the ``recipe`` (``LLM.load``
    keyword arguments). Starts a worker unless one is running in that directory (it will find the request);
    returns the worker started, if any. Never raises for a worker that cannot start: it returns None and the
    caller decodes eagerly."""
    directory = package.parent
    (directory / REQUESTS).mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / REQUESTS / (package.name + ".json"), {**spec, "package": package.name})
    if building(directory):
        return None
    return start_worker(directory)


def start_worker(directory: Path) -> subprocess.Popen | None:
    """Start ``python -m scratchlm.aot_background DIRECTORY``: detached (its own session, no terminal, no pipes
    of ours: a caller that captures our output is not kept waiting for it), its stderr in ``build.log``."""
    try:
        with open(directory / LOG, "ab") as log:
            return subprocess.Popen([sys.executable, "-m", "scratchlm.aot_background", str(directory)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                    start_new_session=True, close_fds=True)
    except OSError:
        return None


def example_inputs(spec: dict):
    """Inputs of the layout's shapes and strides for ``aot.build_package`` (their values do not matter)."""
    import torch

    dtype = getattr(torch, spec["dtype"])
    batch = spec["shape"][0]
    k = [torch.empty_strided(spec["shape"], spec["stride"], dtype=dtype).zero_() for _ in range(spec["n_layers"])]
    v = [torch.empty_strided(spec["shape"], spec["stride"], dtype=dtype).zero_() for _ in range(spec["n_layers"])]
    return torch.zeros(batch, 1, dtype=torch.long), torch.zeros(batch, dtype=torch.long), k, v


def _build(directory: Path, spec: dict, models: dict) -> None:
    import torch

    from scratchlm import aot
    from scratchlm.compile_cache import cache_dir, locked, prepare
    from scratchlm.llm import LLM

    key = json.dumps(spec["recipe"], sort_keys=True)
    if key not in models:
        models[key] = LLM.load(**spec["recipe"], compile=False).model
    model = models[key]
    if cache_dir(model).name != directory.name:
        raise RuntimeError("the model loaded again from its source has another compile key (was it changed after "
                           "loading?)")
    prepare(directory, model)
    torch.set_num_threads(spec["threads"])  # inductor writes the thread count into the generated loops
    package = directory / spec["package"]
    with locked(package):
        if not package.is_file():
            aot.build_package(model, *example_inputs(spec), package)


def work(directory: Path, nice: int = NICE) -> int:
    """The worker: build every requested package of ``directory`` that is missing, then return (0). ``nice``: how
    much to lower this process's priority first (the worker process; a test calling it in-process passes 0)."""
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    models: dict = {}
    handled: set[str] = set()  # request names seen (each tried once per worker, even if its file stays)
    while True:
        with open(directory / LOCK, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another worker holds it; it looks for requests again after releasing it (below)
            build_requested(directory, models, handled)
        # A process that wrote its request after our last look, while we still held the lock, found the lock taken
        # and left its request to us: look once more now that the lock is free.
        if not any(p.name not in handled for p in (directory / REQUESTS).glob("*.json")):
            return 0


def build_requested(directory: Path, models: dict, done: set[str]) -> None:
    """Build the package of every request in ``directory`` not in ``done`` (each request file removed once
    handled and its name added to ``done``, a failure recorded beside its package), until none is left. The
    caller holds the build lock; ``models``: the models loaded so far, by how they were loaded."""
    while True:
        pending = [p for p in sorted((directory / REQUESTS).glob("*.json")) if p.name not in done]
        if not pending:
            return
        for path in pending:
            done.add(path.name)
            try:
                spec = read_json(path)
                package = directory / spec["package"]
                if not package.is_file() and failure(package) is None:
                    started = time.perf_counter()
                    _build(directory, spec, models)
                    print(f"built {package.name} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            except Exception as exc:  # noqa: BLE001 - any failure: recorded, the decoders stay eager
                traceback.print_exc()
                line = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
                try:
                    atomic_write_bytes(failed_marker(directory / path.name.removesuffix(".json")),
                                       (line + "\n").encode())
                except OSError:
                    pass
            finally:
                path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(work(Path(sys.argv[1]), int(os.environ.get("SCRATCHLM_BUILD_NICE", NICE))))
