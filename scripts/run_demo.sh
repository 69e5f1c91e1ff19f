#!/usr/bin/env bash
# The main job: a PRDP finetune of the embedded miniature-world model (no download, no GPU) on
# the world-alignment reward (a tiny contrastive image-text scorer), evaluated on captions the
# model never saw. First use pretrains the world model and the scorer (cached in
# $PRDP_CACHE_DIR, else ~/.cache/comfyui-prdp). The settings are the best measured so far (cpu-smoke's
# lr 0.02 degraded the model); extra arguments go to `python -m comfyui_prdp train` and override them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OUT="runs/demo-$(date +%Y%m%d-%H%M%S)"
.venv/bin/python -m comfyui_prdp train --out "$OUT" --base embedded-world --reward world-alignment \
    --preset cpu-smoke --width 32 --height 32 --prompts-per-epoch 8 --learning-rate 0.01 --beta 0.01 "$@"
echo "see $OUT/before_after.png (unseen prompts), $OUT/reward_curve.png and $OUT/held_out.json"
