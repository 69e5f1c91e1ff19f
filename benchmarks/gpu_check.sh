#!/usr/bin/env bash
# The GPU benchmark (issue 13.4): one table of PRDP training at real model sizes, random weights
# built from configs (SD1.5 at 512 px with consumer-gpu, SDXL at 1024 px with consumer-gpu-sdxl):
# seconds per epoch by phase, torch.cuda.max_memory_allocated, the on-policy difference with
# fp16 / bf16 against fp32, update-phase peak memory at T=20 vs T=50 (flat), and PRDP vs DDPO
# epoch time. Under 5 minutes on one modern GPU (see benchmarks/gpu_bench.py for the rows).
#
#   bash benchmarks/gpu_check.sh            (needs CUDA; exits 2 without it)
#   bash benchmarks/gpu_check.sh --cpu      (toy sizes on the CPU: tries the script out)
#
# Env: PYTHON (default .venv/bin/python), GPU_CHECK_TIMEOUT (seconds, default 600).
# The LoRA-under-ComfyUI-memory-modes check (issue 9.3) is benchmarks/gpu_memory_modes.sh.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-$repo/.venv/bin/python}"

if [ "${1:-}" != "--cpu" ] && ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to torch in $python: pass --cpu for toy sizes (nothing was run)" >&2
    exit 2
fi
if [ "${1:-}" != "--cpu" ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
fi
exec timeout "${GPU_CHECK_TIMEOUT:-600}" "$python" "$here/gpu_bench.py" "$@"
