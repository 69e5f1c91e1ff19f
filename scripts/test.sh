#!/usr/bin/env bash
# The test suite: sets up .venv (plus the requirements of every ComfyUI tree found, and Debian's
# chromium for the frontend test), then runs pytest with the given arguments.
#
# ComfyUI trees (scripts/comfyui_trees.sh): $COMFYUI_ROOTS (colon-separated) as given, else
# $COMFYUI_ROOT, else every ComfyUI source tree at ~/ComfyUI and ~/ComfyUI-*; exported as
# COMFYUI_ROOTS. The real-server
# tests (server, workflows, frontend) run once per tree, their ids naming its version. The
# in-process tests import one ComfyUI per process: the main run uses the first tree, then one
# more pytest run per further tree selects them again (-m comfy_inprocess, the same arguments).
# Tests that need ComfyUI or chromium skip with the reason when they are absent.
# The exit status is the main run's, else the first failing extra run's (an extra run that
# selects no test, exit 5, counts as passed).
set -euo pipefail
cd "$(dirname "$0")/.."

COMFYUI_ROOTS="$(bash scripts/comfyui_trees.sh)"
if [ -n "$COMFYUI_ROOTS" ]; then
    export COMFYUI_ROOTS
    echo "test.sh: ComfyUI trees: $COMFYUI_ROOTS"
else
    unset COMFYUI_ROOTS
    echo "test.sh: no ComfyUI tree found (set COMFYUI_ROOTS or COMFYUI_ROOT); ComfyUI tests will skip"
fi

bash scripts/setup_env.sh --test
PY="${PRDP_VENV:-.venv}/bin/python"

status=0
"$PY" -m pytest "$@" || status=$?

if [ -n "${COMFYUI_ROOTS:-}" ]; then
    IFS=':' read -r -a trees <<< "$COMFYUI_ROOTS"
    for tree in "${trees[@]:1}"; do
        [ -n "$tree" ] || continue
        echo "test.sh: in-process ComfyUI tests against $tree"
        rc=0
        COMFYUI_ROOTS="$tree" "$PY" -m pytest "$@" -m comfy_inprocess || rc=$?
        if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ] && [ "$status" -eq 0 ]; then status=$rc; fi
    done
fi
exit "$status"
