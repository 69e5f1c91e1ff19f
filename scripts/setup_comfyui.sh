#!/usr/bin/env bash
# Make every ComfyUI source tree the tests use runnable from one Python environment, for the
# tests against a real ComfyUI server (tests/test_comfy_*.py). Idempotent; never replaces torch.
#
# Trees: $COMFYUI_ROOTS (colon-separated), else $COMFYUI_ROOT, else ~/ComfyUI (the order the
# tests use, tests/comfy_harness.py). A listed folder that is no ComfyUI tree is reported and
# skipped (its tests then skip with the same reason); no tree at all prints why and exits 0.
#
# Per tree, its requirements.txt is installed minus torch/torchvision/torchaudio (torch is this
# project's own dependency), plus `requests` (imported, not listed). A requirement counts as met
# when installed at a version it allows, or, for an exact `==` pin, at a newer version (what
# ComfyUI itself accepts: it warns only about older ones), so trees with different pins share
# one environment without reinstalling on every run. Essential requirements must install;
# those under requirements.txt's "non essential" line are tried and a failure is only reported.
# Each pip call runs under a constraints file holding the installed torch/torchvision, so no
# requirement can replace them.
#
# torchaudio: ComfyUI 0.33+ imports it at startup (comfy/sd.py -> the LTX audio VAE; older trees
# lose only their audio nodes without it). When a tree lists it and it does not import,
# $PRDP_TORCHAUDIO_SPEC (default torchaudio==2.11.1, the registry's newest) is installed with
# --no-deps, so its torch requirement is never resolved; torch is checked unchanged afterwards.
#
# Frontend: each tree's exact comfyui-frontend-package pin that differs from the installed one
# is unpacked (--no-deps --target) into <env>/comfyui-frontends/<version>/; the test harness
# starts that tree's server with --front-end-root pointing there, so every tree is tested with
# the frontend it ships with.
# Usage: scripts/setup_comfyui.sh [python]   (default: $PYTHON, else python3 on PATH)
set -euo pipefail

PY="${1:-${PYTHON:-python3}}"
TORCHAUDIO_SPEC="${PRDP_TORCHAUDIO_SPEC:-torchaudio==2.11.1}"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if [ -n "${COMFYUI_ROOTS:-}" ]; then
    IFS=':' read -r -a TREES <<< "$COMFYUI_ROOTS"
elif [ -n "${COMFYUI_ROOT:-}" ]; then
    TREES=("$COMFYUI_ROOT")
else
    TREES=("$HOME/ComfyUI")
fi

torch_versions() {
    "$PY" - <<'PYEOF'
import importlib.metadata
for name in ("torch", "torchvision"):
    try:
        print(f"{name}=={importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        pass
PYEOF
}

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
torch_versions > "$CONSTRAINTS"
TORCH_BEFORE="$(cat "$CONSTRAINTS")"

check_torch_unchanged() {
    if [ "$(torch_versions)" != "$TORCH_BEFORE" ]; then
        echo "setup_comfyui: ERROR: torch changed from [$TORCH_BEFORE] to [$(torch_versions)];" \
             "reinstall the torch you had" >&2
        exit 1
    fi
}

# Prints the unmet requirements of requirements.txt $1, one per line, each prefixed with
# "essential " or "optional ".
unmet_requirements() {
    "$PY" - "$1" <<'PYEOF'
import importlib.metadata, sys
from packaging.requirements import Requirement
from packaging.version import Version

skip = {"torch", "torchvision", "torchaudio"}
section = "essential"
lines = ["requests"] + open(sys.argv[1], encoding="utf-8").read().splitlines()
for raw in lines:
    if "non essential" in raw.lower():
        section = "optional"
    line = raw.split("#", 1)[0].strip()
    if not line:
        continue
    requirement = Requirement(line)
    if requirement.name.lower() in skip or (requirement.marker and not requirement.marker.evaluate()):
        continue
    try:
        installed = Version(importlib.metadata.version(requirement.name))
    except importlib.metadata.PackageNotFoundError:
        print(section, line)
        continue
    pins = [s.version for s in requirement.specifier if s.operator == "=="]
    if requirement.specifier.contains(installed, prereleases=True):
        continue
    if pins and all(installed >= Version(pin) for pin in pins):
        continue
    print(section, line)
PYEOF
}

frontend_pin() {
    sed -n 's/^comfyui-frontend-package==\([0-9.]*\).*/\1/p' "$1/requirements.txt" | head -1
}

setup_tree() {
    local root="$1"
    if [ ! -f "$root/main.py" ] || [ ! -f "$root/requirements.txt" ]; then
        echo "setup_comfyui: no ComfyUI source tree at $root (set COMFYUI_ROOTS or COMFYUI_ROOT); skipped"
        return 0
    fi
    local essential=() optional=() kind requirement
    while read -r kind requirement; do
        [ -z "$kind" ] && continue
        if [ "$kind" = essential ]; then essential+=("$requirement"); else optional+=("$requirement"); fi
    done < <(unmet_requirements "$root/requirements.txt")
    if [ ${#essential[@]} -gt 0 ]; then
        echo "setup_comfyui: installing for $root:" "${essential[@]}"
        "${PIP[@]}" -c "$CONSTRAINTS" "${essential[@]}"
    fi
    if [ ${#optional[@]} -gt 0 ]; then
        echo "setup_comfyui: installing the non-essential requirements of $root:" "${optional[@]}"
        "${PIP[@]}" -c "$CONSTRAINTS" "${optional[@]}" \
            || echo "setup_comfyui: some non-essential requirements of $root did not install (tolerated)"
    fi
    if grep -qiE '^torchaudio' "$root/requirements.txt" && ! "$PY" -c "import torchaudio" 2>/dev/null; then
        echo "setup_comfyui: $root requires torchaudio; installing $TORCHAUDIO_SPEC --no-deps"
        "${PIP[@]}" --no-deps "$TORCHAUDIO_SPEC"
        "$PY" -c "import torchaudio" || { echo "setup_comfyui: ERROR: torchaudio does not import" >&2; exit 1; }
    fi
    check_torch_unchanged
    echo "setup_comfyui: $root ready ($(sed -n 's/^__version__ = "\(.*\)"/ComfyUI \1/p' "$root/comfyui_version.py" 2>/dev/null))"
}

# after every tree's requirements: the installed frontend is then final
setup_frontend() {
    local root="$1"
    [ -f "$root/requirements.txt" ] || return 0
    local pin installed target
    pin="$(frontend_pin "$root")"
    installed="$("$PY" -c 'import importlib.metadata as m; print(m.version("comfyui-frontend-package"))' 2>/dev/null || true)"
    if [ -n "$pin" ] && [ "$pin" != "$installed" ]; then
        target="$("$PY" -c 'import sys; print(sys.prefix)')/comfyui-frontends/$pin"
        if [ ! -d "$target/comfyui_frontend_package/static" ]; then
            echo "setup_comfyui: unpacking $root's frontend comfyui-frontend-package==$pin into $target"
            rm -rf "$target.tmp"
            "${PIP[@]}" --no-deps --target "$target.tmp" "comfyui-frontend-package==$pin"
            mv "$target.tmp" "$target"
        fi
    fi
}

for tree in "${TREES[@]}"; do
    if [ -n "$tree" ]; then setup_tree "$tree"; fi
done
for tree in "${TREES[@]}"; do
    if [ -n "$tree" ]; then setup_frontend "$tree"; fi
done
exit 0
