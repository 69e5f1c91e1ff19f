#!/usr/bin/env bash
# The main job: a PRDP finetune of the embedded tiny model (no download, no GPU) on the
# JPEG-compressibility reward. Extra arguments go to `python -m comfyui_prdp train`.
#
# `bash scripts/run_demo.sh --world` runs the miniature-world demo instead: the embedded
# world model (captioned 32 px scenes) on the world-alignment reward, evaluated on captions it
# never saw. First use pretrains the world model and its scorer (cached in $PRDP_CACHE_DIR, else
# ~/.cache/comfyui-prdp). Settings: the world-demo preset (config.py). PRDP does not yet raise
# unseen-prompt alignment clear of noise there (docs/research.md: "Why the world demo does not learn yet"),
# so it is not the default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OUT="runs/demo-$(date +%Y%m%d-%H%M%S)"
if [ "${1:-}" = "--world" ]; then
    shift
    .venv/bin/python -m comfyui_prdp train --out "$OUT" --base embedded-world --reward world-alignment \
        --preset world-demo "$@"
    echo "see $OUT/before_after.png (unseen prompts), $OUT/reward_curve.png and $OUT/held_out.json"
    exit 0
fi
.venv/bin/python -m comfyui_prdp train --out "$OUT" --reward jpeg-compressibility --preset cpu-smoke "$@"
echo "see $OUT/reward_curve.png and $OUT/before_after.png"
