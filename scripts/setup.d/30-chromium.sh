#!/usr/bin/env bash
# Debian's chromium for the web-page test (tests/test_webui*.py drives it with Playwright through
# executable_path; Playwright's own browser download does not work offline). Idempotent.
set -euo pipefail
[ -x /usr/bin/chromium ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 && SUDO="sudo" || { echo "[setup] chromium missing and not root: apt-get install -y chromium" >&2; exit 1; }
fi
echo "[setup] installing chromium (Debian package) for the browser test"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
