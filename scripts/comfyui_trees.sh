#!/usr/bin/env bash
# Prints the ComfyUI source trees the tests use, colon-separated (empty when none):
# $COMFYUI_ROOTS as given, else $COMFYUI_ROOT, else every tree at ~/ComfyUI and ~/ComfyUI-*.
# Used by scripts/test.sh and scripts/setup_comfyui.sh (tests/support/harness_trees.py reads the result).
set -euo pipefail
if [ -n "${COMFYUI_ROOTS:-}" ]; then
    echo "$COMFYUI_ROOTS"
elif [ -n "${COMFYUI_ROOT:-}" ]; then
    echo "$COMFYUI_ROOT"
else
    found=()
    for tree in "$HOME/ComfyUI" "$HOME"/ComfyUI-*; do
        if [ -f "$tree/main.py" ] && [ -d "$tree/comfy" ]; then found+=("$tree"); fi
    done
    (IFS=:; echo "${found[*]:-}")
fi
