"""``scratchlm serve``: flags, a real server process on loopback with an API key from the environment, one
structured log line per request, clean shutdown, and a one-line error for a model that does not exist."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from conftest import tiny_llm
from scratchlm.cli import build_parser
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.serve.background import free_port


def scratchlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "scratchlm.cli", *args]


def test_serve_flags_and_defaults():
    args = build_parser().parse_args(["serve", "some-model"])
    assert (args.host, args.port, args.api_key, args.max_batch, args.max_queue) == ("127.0.0.1", 8000, None, 16, 64)
    assert not args.log_prompts and args.dtype == "float32"
    args = build_parser().parse_args(["serve", "m", "--host", "0.0.0.0", "--port", "9", "--api-key", "k",
                                      "--max-batch", "4", "--max-queue", "2", "--log-prompts", "--max-len", "512"])
    assert (args.host, args.port, args.api_key, args.max_batch, args.max_queue, args.max_len) == (
        "0.0.0.0", 9, "k", 4, 2, 512)


def test_serve_runs_logs_and_stops(tmp_path):
    llm = tiny_llm()
    model_dir = save_model_dir(tmp_path / "tiny", llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    port = free_port()
    env = {**os.environ, "SCRATCHLM_API_KEY": "env-key"}
    proc = subprocess.Popen(scratchlm("serve", str(model_dir), "--port", str(port), "--max-batch", "2",
                                      "--log-prompts"), env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer env-key"},
                       json={"model": "tiny", "prompt": "hello there", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        err = proc.stderr.read()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    done = [x for x in lines if x["path"] == "/v1/completions"]
    assert len(done) == 1 and done[0]["status"] == 200 and done[0]["prompt"] == ["hello there"]
    assert done[0]["prompt_tokens"] == 11 and done[0]["completion_tokens"] == 3
    assert [x["status"] for x in lines if x["path"] == "/v1/models"] == [401]


@pytest.mark.parametrize("model", ["no-such-model", "/nonexistent/model.gguf"])
def test_unknown_model_is_a_one_line_error(model):
    r = subprocess.run(scratchlm("serve", model), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:")


def test_a_model_that_fails_to_load_stops_the_server_with_a_one_line_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a GGUF file")
    r = subprocess.run(scratchlm("serve", str(bad), "--port", str(free_port())), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and "broken.gguf" in r.stderr
