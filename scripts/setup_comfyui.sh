#!/usr/bin/env bash
# Make every ComfyUI source tree the tests use runnable from one Python environment, for the
# tests against a real ComfyUI server (tests/comfy/server/). Idempotent; never replaces torch.
#
# Trees (scripts/comfyui_trees.sh): $COMFYUI_ROOTS (colon-separated), else $COMFYUI_ROOT, else
# every tree at ~/ComfyUI and ~/ComfyUI-*. A listed folder that is no ComfyUI tree is reported and
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
# ComfyUI's own packages (frontend, workflow templates, embedded docs, ...): a tree's exact
# `comfy*==V` pins that differ from the installed versions are unpacked (--no-deps --target)
# into <env>/comfyui-overlays/<ComfyUI version>/; the test harness puts that folder first on
# the PYTHONPATH of that tree's server, so every tree runs with the frontend and templates it
# ships with (0.3.64 cannot even start with the newer templates package's layout).
# Usage: scripts/setup_comfyui.sh [python]   (default: $PYTHON, else python3 on PATH)
set -euo pipefail

PY="${1:-${PYTHON:-python3}}"
TORCHAUDIO_SPEC="${PRDP_TORCHAUDIO_SPEC:-torchaudio==2.11.1}"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

TREE_LIST="$(bash "$(dirname "$0")/comfyui_trees.sh")"
if [ -z "$TREE_LIST" ]; then
    echo "setup_comfyui: no ComfyUI source tree (set COMFYUI_ROOTS or COMFYUI_ROOT, or clone ComfyUI to ~/ComfyUI); nothing to do"
    exit 0
fi
IFS=':' read -r -a TREES <<< "$TREE_LIST"

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

# Prints the exact `comfy*==V` pins of requirements.txt $1 whose installed version differs.
foreign_pins() {
    "$PY" - "$1" <<'PYEOF'
import importlib.metadata, re, sys
for raw in open(sys.argv[1], encoding="utf-8"):
    found = re.match(r"^(comfy[A-Za-z0-9_.-]*)==([0-9][0-9A-Za-z.]*)\s*(#.*)?$", raw.strip())
    if not found:
        continue
    try:
        installed = importlib.metadata.version(found.group(1))
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != found.group(2):
        print(f"{found.group(1)}=={found.group(2)}")
PYEOF
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

# After every tree's requirements, so the installed versions are final: a tree whose exact
# comfy* pins differ from them gets those pins in its overlay folder.
setup_overlay() {
    local root="$1" version pins target
    [ -f "$root/requirements.txt" ] || return 0
    version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$root/comfyui_version.py" 2>/dev/null)"
    target="$("$PY" -c 'import sys; print(sys.prefix)')/comfyui-overlays/${version:-unknown}"
    pins="$(foreign_pins "$root/requirements.txt" | sort)"
    if [ -z "$pins" ]; then
        rm -rf "$target"
        return 0
    fi
    if [ -f "$target/PINS" ] && [ "$(cat "$target/PINS")" = "$pins" ]; then
        return 0
    fi
    echo "setup_comfyui: $root pins other versions than installed; unpacking" $pins "into $target"
    rm -rf "$target" "$target.tmp"
    # shellcheck disable=SC2086  # one pin per word
    "${PIP[@]}" --no-deps --target "$target.tmp" $pins
    echo "$pins" > "$target.tmp/PINS"
    mv "$target.tmp" "$target"
}

for tree in "${TREES[@]}"; do
    if [ -n "$tree" ]; then setup_tree "$tree"; fi
done
for tree in "${TREES[@]}"; do
    if [ -n "$tree" ]; then setup_overlay "$tree"; fi
done
exit 0
