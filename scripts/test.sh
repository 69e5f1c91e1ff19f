#!/usr/bin/env bash
# The test suite, by tier (tests/README.md). Sets up .venv (scripts/setup_env.sh), then runs pytest.
#
#   bash scripts/test.sh [pytest args]           the fast tier, tests/unit: the engine's equations,
#                                                objective, policies, update exactness, checkpoints,
#                                                prompts, rewards on tiny models (no ComfyUI, no
#                                                CLI subprocess, no torchrun, no pretraining)
#   bash scripts/test.sh --all [pytest args]     every tier, fast ones first (what CI runs)
#   bash scripts/test.sh TIER... [pytest args]   the named tiers: unit integration distributed
#                                                comfy-inprocess comfy-server
#   bash scripts/test.sh PATH... [pytest args]   just those files or folders (tests/...), one run
#
# Each tier runs in its own pytest process and prints its wall time. The fast tier needs only
# the engine's dependencies and pytest; the comfy tiers also set up ComfyUI's requirements,
# playwright and Debian's chromium (setup_env.sh --test-all).
#
# ComfyUI trees (scripts/comfyui_trees.sh): $COMFYUI_ROOTS (colon-separated) as given, else
# $COMFYUI_ROOT, else every ComfyUI source tree at ~/ComfyUI and ~/ComfyUI-*; exported as
# COMFYUI_ROOTS. The real-server tests (comfy-server) run once per tree, their ids naming its
# version. The in-process tests import one ComfyUI per process: comfy-inprocess runs once with
# the first tree, then once more per further tree. Tests that need ComfyUI or chromium skip
# with the reason when they are absent.
# The exit status is the first failing run's (a run that selects no test, exit 5, counts as
# passed for the per-tree extra runs only).
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_TIERS=(unit integration comfy-inprocess distributed comfy-server)
tiers=()
while [ $# -gt 0 ]; do
    case "$1" in
        --all) tiers=("${ALL_TIERS[@]}"); shift ;;
        unit|integration|distributed|comfy-inprocess|comfy-server) tiers+=("$1"); shift ;;
        *) break ;;
    esac
done
paths=()   # test files or folders given instead of tiers: one pytest run of exactly those
for arg in "$@"; do
    if [ "${arg#-}" = "$arg" ] && [ -e "${arg%%::*}" ]; then paths+=("${arg%%::*}"); fi
done
if [ ${#tiers[@]} -eq 0 ]; then
    if [ ${#paths[@]} -gt 0 ]; then tiers=(paths); else tiers=(unit); fi
fi

tier_dir() {
    case "$1" in
        comfy-inprocess) echo tests/comfy/inprocess ;;
        comfy-server) echo tests/comfy/server ;;
        *) echo "tests/$1" ;;
    esac
}

needs_comfy=0
for tier in "${tiers[@]}"; do
    case "$tier" in comfy-*) needs_comfy=1 ;; esac
done
for path in "${paths[@]}"; do
    case "$(cd "$(dirname "$path")" && pwd)/$(basename "$path")/" in
        "$PWD/tests/comfy/"*|"$PWD/tests/"|"$PWD/tests/comfy/") needs_comfy=1 ;;
    esac
done

if [ "$needs_comfy" = 1 ]; then
    COMFYUI_ROOTS="$(bash scripts/comfyui_trees.sh)"
    if [ -n "$COMFYUI_ROOTS" ]; then
        export COMFYUI_ROOTS
        echo "test.sh: ComfyUI trees: $COMFYUI_ROOTS"
    else
        unset COMFYUI_ROOTS
        echo "test.sh: no ComfyUI tree found (set COMFYUI_ROOTS or COMFYUI_ROOT); ComfyUI tests will skip"
    fi
    bash scripts/setup_env.sh --test-all
else
    bash scripts/setup_env.sh --test
fi
PY="${PRDP_VENV:-.venv}/bin/python"

status=0
record() {   # record WHAT RC SECONDS [ALLOW_EMPTY]
    local outcome=passed
    if [ "$2" -ne 0 ] && ! { [ "${4:-0}" = 1 ] && [ "$2" -eq 5 ]; }; then
        outcome="FAILED (exit $2)"
        [ "$status" -ne 0 ] || status=$2
    fi
    echo "test.sh: $1 $outcome in $3 s"
}

for tier in "${tiers[@]}"; do
    started=$SECONDS
    rc=0
    if [ "$tier" = paths ]; then
        "$PY" -m pytest "$@" || rc=$?
        record "the given paths" "$rc" "$((SECONDS - started))"
        continue
    fi
    dir="$(tier_dir "$tier")"
    "$PY" -m pytest "$dir" "$@" || rc=$?
    record "tier $tier" "$rc" "$((SECONDS - started))"
    if [ "$tier" = comfy-inprocess ] && [ -n "${COMFYUI_ROOTS:-}" ]; then
        IFS=':' read -r -a trees <<< "$COMFYUI_ROOTS"
        for tree in "${trees[@]:1}"; do
            [ -n "$tree" ] || continue
            echo "test.sh: in-process ComfyUI tests against $tree"
            started=$SECONDS
            rc=0
            COMFYUI_ROOTS="$tree" "$PY" -m pytest "$dir" "$@" || rc=$?
            record "tier $tier ($tree)" "$rc" "$((SECONDS - started))" 1
        done
    fi
done
exit "$status"
