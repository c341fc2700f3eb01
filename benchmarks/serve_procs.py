"""Starting, watching and stopping the servers that benchmarks/serve.py races: scratchlm's and llama.cpp's
llama-server, each in its own process on a free loopback port, with the peak RSS of its process tree."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

READY_TIMEOUT = 600  # seconds a server may take to load (a loaded 2-core machine needs minutes)
SLOT_CONTEXT = 256  # llama-server positions per slot: a prompt of about 40 tokens + 64 new ones fits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RSSSampler:
    """Peak resident memory of a process and its descendants, sampled on a thread every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.root, self.interval = psutil.Process(pid), interval
        self._tree: list[psutil.Process] = []
        self._samples = 0
        self.peak_tree = 0
        self.hwm = 0  # the root's own high-water mark (VmHWM): catches a peak between two samples
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        try:
            # Finding descendants scans all of /proc: once a second; reading known processes' RSS is cheap.
            if self._samples % 20 == 0:
                self._tree = [self.root, *self.root.children(recursive=True)]
            self._samples += 1
            total = 0
            for proc in self._tree:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:  # a child that just ended
                    pass
            self.peak_tree = max(self.peak_tree, total)
            with open(f"/proc/{self.root.pid}/status") as f:
                hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
            self.hwm = max(self.hwm, hwm)
        except (psutil.Error, OSError, StopIteration):
            pass

    def stop(self) -> int:
        """Stop sampling (before the process ends) and return the peak in bytes."""
        if not self._stop.is_set():
            self._samples = 0  # look for new children once more
            self.sample()
        self._stop.set()
        self._thread.join()
        return max(self.peak_tree, self.hwm)


@contextmanager
def running(cmd: list[str], port: int, name: str):
    """Start a server process, wait until /health answers 200, yield (url, RSSSampler); always stop it after,
    also on an error or Ctrl-C (SIGTERM, then SIGKILL after 30 s). Its output goes to a temporary log whose end
    is shown when it fails to start."""
    log = tempfile.NamedTemporaryFile("w+", prefix=f"serve-bench-{name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    sampler = RSSSampler(proc.pid)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with code {proc.returncode} while starting:\n{tail(log.name)}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not become ready in {READY_TIMEOUT} s:\n{tail(log.name)}")
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url, sampler
    finally:
        sampler.stop()  # idempotent: the caller usually stopped it already, before the server ends
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        os.unlink(log.name)


def tail(path: str, lines: int = 15) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def scratchlm_command(model: str, max_batch: int, threads: int, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "scratchlm.cli", "--threads", str(threads), "serve", model, "--port", str(port),
            "--max-batch", str(max_batch), "--max-queue", "256", *extra]


def llama_server_command(binary: str, gguf: Path, slots: int, threads: int, port: int) -> list[str]:
    # -t/-tb: threads for decoding and for prompt batches; -np: slots decoded together (continuous batching is
    # on by default); -c: the context of all slots together, split evenly between them.
    return [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
            "-tb", str(threads), "-np", str(slots), "-c", str(slots * SLOT_CONTEXT)]


def start_server(model: str, max_batch: int, threads: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """A scratchlm server that the caller stops (``proc.terminate()``): for serve_cache.py."""
    port = free_port()
    proc = subprocess.Popen(scratchlm_command(model, max_batch, threads, port, *extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready")
