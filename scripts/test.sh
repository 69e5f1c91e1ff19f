#!/usr/bin/env bash
# The test suite: sets up .venv (plus ComfyUI's requirements where a ComfyUI tree is found at
# $COMFYUI_ROOT or ~/ComfyUI, and Debian's chromium for the frontend test), then runs pytest.
# Tests that need ComfyUI or chromium skip with the reason when they are absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --test
if [ -z "${COMFYUI_ROOT:-}" ] && [ -f "$HOME/ComfyUI/main.py" ]; then
    export COMFYUI_ROOT="$HOME/ComfyUI"
fi
exec .venv/bin/python -m pytest "$@"
