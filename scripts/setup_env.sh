#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install what the engine
# needs. Idempotent. torch is installed only when missing and never pinned by the package:
# ComfyUI users already have the torch that fits their GPU.
# Usage: scripts/setup_env.sh [--test | --test-all]
#   --test      adds pytest: what the fast test tier (tests/unit) needs
#   --test-all  adds the test extras (pytest, playwright, websocket-client, requests), the
#               requirements of each ComfyUI tree (scripts/setup_comfyui.sh) and Debian's
#               chromium: what every tier needs
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PRDP_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "setup_env: installing torch (none in $VENV)"
    "${PIP[@]}" torch torchvision
fi
if ! "$PY" -c "import comfyui_prdp, diffusers, transformers, peft, open_clip, safetensors, aiohttp" 2>/dev/null \
   || ! "$PY" -m pip show -q comfyui-prdp >/dev/null 2>&1; then
    echo "setup_env: installing comfyui-prdp and its dependencies"
    "${PIP[@]}" -e .
fi
case "${1:-}" in
    --test)
        "$PY" -c "import pytest" 2>/dev/null || "${PIP[@]}" "pytest>=8"
        ;;
    --test-all)
        "$PY" -c "import pytest, playwright, websocket, requests" 2>/dev/null || "${PIP[@]}" -e ".[test]"
        bash scripts/setup_comfyui.sh "$PY"
        bash scripts/install_chromium.sh
        ;;
    "") ;;
    *) echo "setup_env: unknown option $1 (use --test or --test-all)" >&2; exit 2 ;;
esac
echo "setup_env: ready ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
