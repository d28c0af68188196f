#!/usr/bin/env bash
# Idempotent install of llama-cpp-python 0.3.36, used by the tests that check llama.cpp itself reads
# the GGUF files `lorakit export` writes. It is built from source (~6 min on 2 cores), so it is NOT a
# pyproject dependency (a plain `pip install lorakit` would compile llama.cpp); lorakit's own GGUF writer
# only needs the pure-Python `gguf` package.
#
# Built with AMX off: ggml's AMX matmul segfaults on the first decode on this CPU family
# (stack-pitfalls.md item 4). `--no-cache-dir` because pip's wheel cache ignores CMAKE_ARGS and could
# hand back a wheel built with AMX on.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
VERSION=0.3.36

# Installed, right version, and AMX compiled out -> nothing to do.
if "$PY" - "$VERSION" <<'PYEOF' 2>/dev/null
import sys
import llama_cpp
if llama_cpp.__version__ != sys.argv[1]:
    sys.exit(1)
info = llama_cpp.llama_print_system_info().decode()
sys.exit(1 if "AMX_INT8 = 1" in info or "AMX = 1" in info else 0)
PYEOF
then
  exit 0
fi

echo "[setup] building llama-cpp-python==$VERSION from source with AMX off (~6 min on 2 cores)"
# Not GGML_NATIVE (it would turn AMX back on where the CPU has it): name the SIMD sets this CPU has.
cpu_flag() { grep -qw "$1" /proc/cpuinfo 2>/dev/null && echo ON || echo OFF; }
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=$(cpu_flag avx) -DGGML_AVX2=$(cpu_flag avx2) -DGGML_FMA=$(cpu_flag fma) \
-DGGML_F16C=$(cpu_flag f16c) -DGGML_AVX512=$(cpu_flag avx512f) -DGGML_AVX512_VNNI=$(cpu_flag avx512_vnni) \
-DGGML_AVX512_BF16=$(cpu_flag avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$PY" -m pip install --disable-pip-version-check --quiet --no-cache-dir --force-reinstall --no-deps -c constraints.txt \
  "llama-cpp-python==$VERSION"
# Runtime deps of llama_cpp (numpy, typing-extensions, diskcache, jinja2) without touching torch & co.
"$PY" -m pip install --disable-pip-version-check --quiet -c constraints.txt "diskcache>=5.6.1" "jinja2>=2.11.3" numpy typing-extensions
