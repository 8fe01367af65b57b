#!/usr/bin/env bash
# The project's whole check, from a bare checkout:
#
#   bash scripts/test.sh [extra pytest args]
#
# 1. sets up .venv (scripts/setup_env.sh; fast when already done)
# 2. prepares the ComfyUI test host in .host/ (scripts/setup_comfyui_host.py)
# 3. installs Chromium and its driver for the browser tests, if missing
# 4. ruff, then pytest. "No tests collected" counts as a failure.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PY="${TURBOBOOTH_VENV:-$REPO_ROOT/.venv}/bin/python"

bash scripts/setup_env.sh
"$PY" scripts/setup_comfyui_host.py

have_browser() {
    { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; } &&
        command -v chromedriver >/dev/null 2>&1
}
if ! have_browser; then
    echo "[test] installing chromium + chromium-driver (Debian packages) for the browser tests"
    SUDO=""
    if [[ "$(id -u)" != "0" ]] && command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    have_browser || { echo "[test] error: chromium/chromedriver still missing after apt-get install" >&2; exit 1; }
fi

echo "[test] ruff check ."
"$PY" -m ruff check .

set +e
"$PY" -m pytest -q "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "[test] error: pytest collected no tests" >&2
    exit 1
fi
exit $rc
