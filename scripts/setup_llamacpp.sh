#!/usr/bin/env bash
# Build llama-cpp-python (it compiles llama.cpp) and install it into a virtualenv OUTSIDE the repository,
# for scripts/llamacpp_proof.py. Never run in CI: the build takes about 6 minutes on 2 cores.
#
#   bash scripts/setup_llamacpp.sh
#
# WHEEL_DIR (default $SCRATCHLM_HOME/wheels, i.e. ~/.cache/scratchlm/wheels): where the wheel is built, or
#   reused when a llama_cpp_python-$VERSION wheel is already there (benchmarks/setup_llamacpp.sh builds the
#   same one: point both at one folder to build it once).
# LLAMA_VENV (default $SCRATCHLM_HOME/llamacpp-venv): the virtualenv; it needs only numpy besides the wheel.
# GGML_NATIVE=OFF: a -march=native build segfaults on the development machines' CPU; build the portable one.
set -euo pipefail
if [ "${CI:-}" = "true" ]; then
    echo "setup_llamacpp.sh: refusing to compile llama.cpp in CI" >&2
    exit 1
fi
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
HOME_DIR="${SCRATCHLM_HOME:-$HOME/.cache/scratchlm}"
WHEEL_DIR="${WHEEL_DIR:-$HOME_DIR/wheels}"
LLAMA_VENV="${LLAMA_VENV:-$HOME_DIR/llamacpp-venv}"
mkdir -p "$WHEEL_DIR"
[ -x "$LLAMA_VENV/bin/python" ] || python3 -m venv "$LLAMA_VENV"
wheel=$(ls "$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
    echo "building llama-cpp-python $VERSION into $WHEEL_DIR (several minutes)..."
    CMAKE_ARGS="-DGGML_NATIVE=OFF" "$LLAMA_VENV/bin/pip" wheel --no-cache-dir --no-deps -w "$WHEEL_DIR" \
        "llama-cpp-python==$VERSION"
    wheel=$(ls "$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl | head -1)
fi
"$LLAMA_VENV/bin/pip" install --quiet "$wheel"
"$LLAMA_VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
echo "ready: $LLAMA_VENV/bin/python (pass it to scripts/llamacpp_proof.py --llama-python if not the default)"
