#!/usr/bin/env bash
# Fresh machine -> set up .venv -> personalize-then-generate demo on the built-in tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m turbobooth demo --out "${1:-demo_output}"
