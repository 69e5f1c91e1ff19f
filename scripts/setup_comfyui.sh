#!/usr/bin/env bash
# Make a ComfyUI source tree runnable from the current Python environment, for the tests
# against a real ComfyUI server (tests/test_comfy_*.py). Idempotent; never installs torch.
#
# ComfyUI is found at $COMFYUI_ROOT, else ~/ComfyUI. Without one this prints why and exits 0
# (those tests then skip with the same reason). Its requirements.txt is installed minus
# torch/torchvision/torchaudio (torch is this project's own dependency; ComfyUI runs
# without torchaudio, losing only its audio nodes), plus `requests`, which ComfyUI imports
# but does not list. Packages already present are left alone.
# Usage: scripts/setup_comfyui.sh [python]   (default: $PYTHON, else python3 on PATH)
set -euo pipefail

PY="${1:-${PYTHON:-python3}}"
ROOT="${COMFYUI_ROOT:-$HOME/ComfyUI}"

if [ ! -f "$ROOT/main.py" ] || [ ! -f "$ROOT/requirements.txt" ]; then
    echo "setup_comfyui: no ComfyUI source tree at $ROOT (set COMFYUI_ROOT); nothing to do"
    exit 0
fi

missing="$("$PY" - "$ROOT/requirements.txt" <<'PYEOF'
import importlib.metadata, re, sys
skip = {"torch", "torchvision", "torchaudio"}
wanted = ["requests"]
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.split("#", 1)[0].strip()
    if line:
        wanted.append(line)
for requirement in wanted:
    name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
    if name.lower() in skip:
        continue
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        print(requirement)
PYEOF
)"

if [ -z "$missing" ]; then
    echo "setup_comfyui: requirements of $ROOT already installed for $PY"
    exit 0
fi

echo "setup_comfyui: installing into $PY:" $missing
# shellcheck disable=SC2086  # one requirement per word
"$PY" -m pip install --disable-pip-version-check $missing
