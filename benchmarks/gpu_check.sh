#!/usr/bin/env bash
# The GPU check (issue 20.5), one command on a bare GPU machine: it sets up its own environment,
# then runs benchmarks/gpu_bench.py, which prints one table and exits non-zero when a row fails.
# Rows: SD1.5 (consumer-gpu, 512 px) and SDXL (consumer-gpu-sdxl, 1024 px) at real sizes with
# random weights built from configs, in fp16 and bf16; a small neural reward built the way the
# Load Reward node builds it (under torch.inference_mode()); peak memory under a 12 GB card's cap
# against the presets' budgets; epoch time by phase against a FLOP floor; PRDP vs DDPO.
# Under 8 minutes on one H100 (gpu_bench.py stops starting rows after --deadline seconds).
#
#   bash benchmarks/gpu_check.sh            (needs CUDA; exits 2 without it, saying why)
#   bash benchmarks/gpu_check.sh --cpu      (toy sizes on the CPU: tries the script out)
#
# Environment: without PYTHON, the project's venv (PRDP_VENV, default .venv) is used. Where it
# does not exist it is created with `$BASE_PYTHON -m venv --system-site-packages` (default
# python3), so a CUDA torch installed system-wide is reused, then scripts/setup_env.sh installs
# what is missing with the installed torch pinned (PIP_CONSTRAINT): a working CUDA torch is
# never replaced. A set-up that fails prints its own error and exits 3.
# Env: PYTHON (an interpreter that has everything: no set-up), PRDP_VENV, BASE_PYTHON,
# GPU_CHECK_TIMEOUT (seconds, default 480). Other arguments go to gpu_bench.py (see its --help).
# The LoRA-under-ComfyUI-memory-modes check (issue 9.3) is benchmarks/gpu_memory_modes.sh.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
work="$(mktemp -d "${TMPDIR:-/tmp}/prdp-gpu-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# print the last lines of a log, then a one-line reason, and exit with the given status
give_up() {
    local status="$1" log="$2" reason="$3"
    if [ -s "$log" ]; then
        echo "---- last lines of its output ----" >&2
        tail -n 40 "$log" >&2
        echo "----------------------------------" >&2
    fi
    echo "gpu_check: $reason" >&2
    exit "$status"
}

# write a pip constraints file pinning the torch that $1 imports (empty when it has none)
pin_installed_torch() {
    "$1" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' 2>/dev/null \
        >"$work/constraints.txt" || : >"$work/constraints.txt"
}

# whether $1, run in the repository, imports everything the check needs
has_what_the_check_needs() {
    (cd "$repo" && "$1" -c 'import torch, diffusers, transformers, peft, open_clip, safetensors, comfyui_prdp' \
        >/dev/null 2>&1)
}

set_up_environment() {
    local venv="${PRDP_VENV:-$repo/.venv}" base="${BASE_PYTHON:-python3}" pinned
    case "$venv" in /*) ;; *) venv="$repo/$venv" ;; esac
    python="$venv/bin/python"
    if [ ! -x "$python" ]; then
        echo "gpu_check: creating $venv ($base -m venv --system-site-packages: a system-wide torch is reused)"
        "$base" -m venv --system-site-packages "$venv" >"$work/venv.log" 2>&1 \
            || give_up 3 "$work/venv.log" "could not create $venv with $base -m venv (a Python >= 3.10 with venv?)"
    fi
    if has_what_the_check_needs "$python"; then
        echo "gpu_check: $venv has what the check needs (no set-up)"
        return
    fi
    pin_installed_torch "$python"
    pinned="$(cat "$work/constraints.txt")"
    echo "gpu_check: setting up $venv with scripts/setup_env.sh" \
         "(${pinned:+kept as installed: }${pinned:-no torch there yet})"
    PRDP_VENV="$venv" PIP_CONSTRAINT="$work/constraints.txt" bash "$repo/scripts/setup_env.sh" \
        >"$work/setup.log" 2>&1 \
        || give_up 3 "$work/setup.log" \
               "setting up $venv failed (scripts/setup_env.sh: its error is above); $(hint "$venv" "$base")"
    tail -n 1 "$work/setup.log"
}

# what to try after a failed set-up
hint() {
    if [ -z "$(cat "$work/constraints.txt")" ] && "$2" -c 'import torch' >/dev/null 2>&1; then
        echo "$2 has a torch that $1 does not see: remove $1 (or set PRDP_VENV to a new folder) to reuse it"
    else
        echo "fix that error, or set PYTHON to an interpreter with torch, diffusers, transformers," \
             "peft and open_clip"
    fi
}

# exit 2 with the reason when torch in $python cannot use a CUDA GPU
require_cuda() {
    "$python" - >"$work/cuda.log" 2>&1 <<'EOF'
import sys
try:
    import torch
except Exception as error:  # noqa: BLE001
    sys.exit(f"cannot import torch: {type(error).__name__}: {error}")
if torch.version.cuda is None:
    sys.exit(f"torch {torch.__version__} is a build without CUDA: install a CUDA build of torch")
if not torch.cuda.is_available():
    try:
        torch.cuda.init()
        reason = f"torch.cuda.device_count() is {torch.cuda.device_count()}"
    except Exception as error:  # noqa: BLE001
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
    sys.exit(f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) cannot use a GPU here: {reason}")
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF
    local status=$?
    if [ "$status" -ne 0 ]; then
        command -v nvidia-smi >/dev/null && nvidia-smi -L >>"$work/cuda.log" 2>&1
        give_up 2 "$work/cuda.log" "no usable CUDA GPU in $python (pass --cpu for toy sizes; nothing was run)"
    fi
    cat "$work/cuda.log"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
}

if [ -n "${PYTHON:-}" ]; then
    python="$PYTHON"
else
    set_up_environment
fi
case " $* " in
    *" --cpu "*) ;;
    *) require_cuda ;;
esac
timeout "${GPU_CHECK_TIMEOUT:-480}" "$python" "$here/gpu_bench.py" "$@"
status=$?
if [ "$status" -eq 124 ]; then
    echo "gpu_check: gpu_bench.py ran past GPU_CHECK_TIMEOUT=${GPU_CHECK_TIMEOUT:-480} s and was stopped" >&2
fi
exit "$status"
