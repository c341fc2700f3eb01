#!/usr/bin/env bash
# Build the llama.cpp peers once, outside the repo. Never run in CI: it compiles llama.cpp twice (about 6 minutes
# for the wheel and 10 for the server on 2 idle cores).
#
#   bash benchmarks/setup_llamacpp.sh            # wheel in $WHEEL_DIR, peer venv in $PEER_VENV, server in $SERVER_DIR
#
# 1. llama-cpp-python (the peer of benchmarks/decode.py), installed into a separate virtualenv that sees
#    scratchlm's .venv packages.
# 2. llama.cpp's own HTTP server, `llama-server` (the peer of benchmarks/serve.py), built from the llama.cpp tree
#    that the same llama-cpp-python sdist vendors (vendor/llama.cpp), so both peers are the same llama.cpp
#    version: $SERVER_DIR/bin/llama-server, one static binary. Each step is skipped when its result exists.
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
SERVER_DIR="${SERVER_DIR:-/work/peers/llama-server}"

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

# ---- llama-server -------------------------------------------------------------------------------------------
# The same flags as the wheel (GGML_NATIVE=OFF: portable AVX2 kernels), plus what an offline machine needs:
# no libcurl or OpenSSL (the benchmark talks plain HTTP on loopback and loads a local file), and no web UI (its
# default fetches prebuilt assets from Hugging Face or runs npm). Static libraries, so the one binary can be
# copied out of the build tree. `nice -n 19`: the machines these run on are shared.
server_bin="$SERVER_DIR/bin/llama-server"
if [ -x "$server_bin" ]; then
    echo "reusing $server_bin"
else
    src="$SERVER_DIR/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
    if [ ! -f "$src/CMakeLists.txt" ]; then
        mkdir -p "$SERVER_DIR/src"
        # --no-binary for this one package only: ":all:" would also build its build dependencies from source.
        .venv/bin/python -m pip download --no-deps --no-binary llama-cpp-python -d "$SERVER_DIR/src" \
            "llama-cpp-python==$VERSION"
        tar -xzf "$SERVER_DIR/src/llama_cpp_python-$VERSION.tar.gz" -C "$SERVER_DIR/src"
    fi
    if ! command -v cmake > /dev/null; then
        echo "setup_llamacpp.sh: cmake is missing: install it (apt-get install -y cmake, or pip install cmake)" >&2
        exit 1
    fi
    echo "building llama-server from $src into $SERVER_DIR (several minutes)..."
    nice -n 19 cmake -S "$src" -B "$SERVER_DIR/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF ${EXTRA_CMAKE_ARGS:-}
    nice -n 19 cmake --build "$SERVER_DIR/build" --target llama-server -j "${JOBS:-2}"
    install -D -m 755 "$SERVER_DIR/build/bin/llama-server" "$server_bin"
fi
"$server_bin" --version 2>&1 | grep -i version || true
echo "llama-server ready: $server_bin"
