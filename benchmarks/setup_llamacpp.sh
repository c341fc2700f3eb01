#!/usr/bin/env bash
# Build llama-cpp-python (the llama.cpp peer for benchmarks/decode.py) once, outside the repo, and install it
# into a separate virtualenv that sees scratchlm's .venv packages. Never run in CI: it compiles llama.cpp
# (about 6 minutes on 2 cores).
#
#   bash benchmarks/setup_llamacpp.sh            # wheel in $WHEEL_DIR, peer venv in $PEER_VENV
#
# Why these flags: a native build (-march=native) segfaults on the AMX Xeons of our machines in llama.cpp's
# AMX kernel, so GGML_NATIVE=OFF builds the portable AVX/AVX2 variants; `pip wheel --no-cache-dir` keeps a
# stale cached wheel from being reused. The wheel is shared with other tools (GGUF export checks): if it is
# already in $WHEEL_DIR it is reused, not rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
WHEEL_DIR="${WHEEL_DIR:-/work/peers/wheels}"
PEER_VENV="${PEER_VENV:-/work/peers/llamacpp-venv}"

if [ "${CI:-}" = "true" ]; then
    echo "setup_llamacpp.sh: refusing to compile llama.cpp in CI" >&2
    exit 1
fi

mkdir -p "$WHEEL_DIR"
wheel=$(ls "$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
    echo "building llama-cpp-python $VERSION into $WHEEL_DIR (several minutes)..."
    CMAKE_ARGS="-DGGML_NATIVE=OFF ${EXTRA_CMAKE_ARGS:-}" .venv/bin/python -m pip wheel --no-cache-dir --no-deps \
        -w "$WHEEL_DIR" "llama-cpp-python==$VERSION"
    wheel=$(ls "$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl | head -1)
else
    echo "reusing $wheel"
fi

# A separate venv that inherits .venv's packages (torch, numpy, scratchlm) through a .pth file, so the
# benchmark can import both engines without llama-cpp-python ever entering the project's own environment.
if [ ! -x "$PEER_VENV/bin/python" ]; then
    .venv/bin/python -m venv "$PEER_VENV"
fi
site=$("$PEER_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
main_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# `import site; site.addsitedir(...)` (not a bare path) so that .venv's own .pth files, among them the
# editable install of scratchlm, are processed too.
echo "import site; site.addsitedir('$main_site')" > "$site/scratchlm_main_venv.pth"
# llama-cpp-python's runtime dependencies are small and pure Python (numpy comes from .venv).
"$PEER_VENV/bin/python" -m pip install --quiet --no-deps "$wheel" typing-extensions diskcache jinja2 MarkupSafe
"$PEER_VENV/bin/python" -c 'import llama_cpp, scratchlm; print("llama_cpp", llama_cpp.__version__, "ready in", "'"$PEER_VENV"'")'
