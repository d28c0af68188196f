#!/usr/bin/env bash
# Prints one hash of everything that decides what scripts/setup.sh installs. setup.sh records it in
# .venv/.lorakit-setup-inputs; .ci/run reuses a checkout's .venv for a fresh clone only when the hashes match.
set -euo pipefail
cd "$(dirname "$0")/.."
cat pyproject.toml constraints.txt scripts/setup.sh scripts/setup.d/*.sh | sha256sum | cut -d' ' -f1
