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


def wait_healthy(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_serve_flags_and_defaults():
    args = build_parser().parse_args(["serve", "some-model"])
    assert (args.host, args.port, args.api_key, args.max_batch, args.max_queue) == ("127.0.0.1", 8000, None, 16, 64)
    assert not args.log_prompts and args.dtype is None  # None: float32, or a quantized GGUF as it is stored
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
        wait_healthy(proc, url)
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


def test_sigterm_during_a_long_stream_ends_it_with_an_error_event_and_exits_within_a_second(tmp_path):
    # A model with a long context, so that one request streams for many seconds unless it is stopped.
    llm = tiny_llm(context_length=4096)
    model_dir = save_model_dir(tmp_path / "tiny", llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(scratchlm("--threads", "1", "serve", str(model_dir), "--port", str(port),
                                      "--max-len", "4096"), stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(proc, url)
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            for line in lines:  # the stream is under way
                if line.startswith("data: {"):
                    events.append(line)
                    break
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            events += [line for line in lines if line.startswith("data:")]
        proc.wait(timeout=30)
        exited = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    assert exited < 1.0, f"the server took {exited:.2f} s to exit after SIGTERM"
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert "shutting down" in last["error"]["message"]
    texts = [json.loads(e[len("data: "):])["choices"][0]["text"] for e in events[:-2]]
    assert 0 < len(texts) < 4000  # it was stopped, not finished
    # uvicorn re-raises the SIGTERM it handled once the shutdown is complete: the usual "terminated" status.
    assert proc.returncode in (0, -signal.SIGTERM), proc.stderr.read()
