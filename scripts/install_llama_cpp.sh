#!/usr/bin/env bash
# Installs llama-cpp-python (the test and benchmark oracle) into the given venv, built from source for
# this CPU with every native instruction set except AMX.
#
# Why: GGML_NATIVE compiles with -march=native, and on CPUs that advertise AMX llama.cpp 0.3.36 emits
# AMX tile code that faults (SIGILL: the tile configuration is optimised away and worker threads never
# request XTILEDATA; upstream llama.cpp PR 26954). -mno-amx-* keeps AVX2/AVX-512/VNNI/BF16 so that
# benchmarks stay fair, and removes only the faulting path.
#
# pip's own wheel cache is keyed by the sdist alone, so a wheel built earlier with other flags (or on
# another CPU) would be reused silently. We never use it: the wheel is built with --no-cache-dir into a
# cache folder whose name hashes the version, the flags, the compiler and the CPU's feature flags.
set -euo pipefail
VENV=$(cd "${1:?usage: install_llama_cpp.sh VENV}" && pwd)  # absolute: the AMX scan below runs in another folder
VERSION=0.3.36
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='${NO_AMX}' -DCMAKE_CXX_FLAGS='${NO_AMX}'"
CPU_FLAGS=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | sort | tr '\n' ' ')
CC_VERSION=$( (${CC:-cc} --version 2>/dev/null || true) | head -1)
KEY=$(printf '%s\n' "$VERSION" "$CMAKE_ARGS" "$CC_VERSION" "$CPU_FLAGS" | sha256sum | cut -c1-16)
CACHE=${MOEFLASH_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moeflash/llama-cpp-python}/$KEY
if ! ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python==$VERSION for this CPU (no AMX; a few minutes, once per CPU and flags) into $CACHE"
    mkdir -p "$CACHE.tmp"
    CMAKE_ARGS="$CMAKE_ARGS" "$VENV/bin/pip" wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
        -w "$CACHE.tmp" "llama-cpp-python==$VERSION"
    # The flags must have reached the compiler: no AMX instruction may be in the libraries.
    if command -v objdump >/dev/null; then
        SCAN=$(mktemp -d)
        (cd "$SCAN" && "$VENV/bin/python" -m zipfile -e "$CACHE.tmp"/llama_cpp_python-*.whl .)
        if find "$SCAN" -name '*.so*' -type f -exec objdump -d {} + | grep -qE '\s(ldtilecfg|tilezero|tileloadd|tdpb[a-z0-9]*)\s'; then
            rm -rf "$SCAN" "$CACHE.tmp"
            echo "error: the llama.cpp build still contains AMX instructions; CMAKE_ARGS did not reach the compiler" >&2
            exit 1
        fi
        rm -rf "$SCAN"
    fi
    rm -rf "$CACHE" && mv "$CACHE.tmp" "$CACHE"
else
    echo "llama-cpp-python==$VERSION: using the wheel built for this CPU and flags in $CACHE"
fi
"$VENV/bin/pip" install --no-cache-dir --force-reinstall --no-deps "$CACHE"/llama_cpp_python-"$VERSION"-*.whl
# its runtime dependencies (numpy, typing-extensions, diskcache, jinja2) from the index as usual
"$VENV/bin/pip" install "llama-cpp-python==$VERSION" --no-build-isolation --find-links "$CACHE" --only-binary llama-cpp-python
