#!/usr/bin/env bash
# The main job: a PRDP finetune of the embedded tiny model (no download, no GPU) on the
# JPEG-compressibility reward. Extra arguments go to `python -m comfyui_prdp train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OUT="runs/demo-$(date +%Y%m%d-%H%M%S)"
.venv/bin/python -m comfyui_prdp train --out "$OUT" --reward jpeg-compressibility --preset cpu-smoke "$@"
echo "see $OUT/reward_curve.png and $OUT/before_after.png"
