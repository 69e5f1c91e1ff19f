#!/usr/bin/env bash
# GPU check of the LoRA attachment under ComfyUI's memory modes (issue 9.3).
#
# Trains a few LoRA steps through ComfyBackend on a random-weight SD1.5-detected checkpoint in
# several ComfyUI memory modes, one process each (ComfyUI's startup flags are per process), and
# checks that the gradients, the trained LoRA and the base model's eps equal those of a
# reference run with the model fully loaded (--gpu-only, no dynamic VRAM):
#   reference        --disable-dynamic-vram --gpu-only   every weight resident, no cast buffers
#   dynamic          (default on NVIDIA)                  ModelPatcherDynamic, comfy-aimdo buffers
#   dynamic-pressure --reserve-vram <all but ~0.3 GiB>    dynamic VRAM with weights evicted
#   legacy           --disable-dynamic-vram              ModelPatcher, normal loading
#   legacy-novram    --disable-dynamic-vram --novram     weights on the CPU, cast per op into
#                                                        reused cast buffers (low-VRAM offload)
# All in fp32 with TF32 off. Needs an NVIDIA GPU; exits 2 without one.
#
#   bash benchmarks/gpu_memory_modes.sh [COMFYUI_ROOT]     (default: $COMFYUI_ROOT, else ~/ComfyUI-0.33)
# Env: PYTHON (default .venv/bin/python), GPU_CHECK_DIR (work folder, default a temporary one),
#      GPU_CHECK_HEADROOM_GB (usable VRAM left in dynamic-pressure, default 0.3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-$repo/.venv/bin/python}"
comfy="${1:-${COMFYUI_ROOT:-$HOME/ComfyUI-0.33}}"

if [ ! -f "$comfy/main.py" ] || [ ! -d "$comfy/comfy" ]; then
    echo "memory_modes: $comfy is not a ComfyUI source tree; pass its path (or set COMFYUI_ROOT)" >&2
    exit 2
fi
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "memory_modes: no CUDA GPU visible to torch in $python: this check needs an NVIDIA GPU (nothing was run)" >&2
    exit 2
fi

work="${GPU_CHECK_DIR:-$(mktemp -d -t prdp-gpu-check.XXXXXX)}"
mkdir -p "$work"
export CUBLAS_WORKSPACE_CONFIG=:4096:8      # deterministic cuBLAS, as ComfyUI's --deterministic sets it
echo "memory_modes: ComfyUI $comfy, work folder $work"
"$python" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"memory_modes: {p.name}, {p.total_memory / 2**30:.1f} GiB, torch {torch.__version__}")'

checkpoint="$work/prdp_tiny_sd15.safetensors"
if [ ! -f "$checkpoint" ]; then
    "$python" "$repo/tests/support/harness_tiny_sd15.py" build-tiny-sd15 "$checkpoint" --comfyui-root "$comfy"
fi

total_gb="$("$python" -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30)')"
reserve_gb="$("$python" -c "print(max(0.0, $total_gb - ${GPU_CHECK_HEADROOM_GB:-0.3}))")"
common=(--force-fp32 --deterministic)
modes=(
    "reference||--disable-dynamic-vram --gpu-only"
    "dynamic|--expect-dynamic|"
    "dynamic-pressure|--expect-dynamic|--reserve-vram $reserve_gb"
    "legacy||--disable-dynamic-vram"
    "legacy-novram||--disable-dynamic-vram --novram"
)
has_dynamic="$(grep -c 'disable-dynamic-vram' "$comfy/comfy/cli_args.py" || true)"

results=()
failed=()
for entry in "${modes[@]}"; do
    IFS='|' read -r name expect flags <<<"$entry"
    if [ "$has_dynamic" = 0 ]; then      # a ComfyUI without dynamic VRAM (e.g. 0.3.64)
        case "$name" in dynamic*) echo "memory_modes[$name]: skipped: this ComfyUI has no dynamic VRAM"; continue ;; esac
        flags="${flags//--disable-dynamic-vram/}"
    fi
    out="$work/$name.pt"
    # shellcheck disable=SC2086  # flags are words
    if "$python" "$here/gpu_memory_modes.py" --comfyui-root "$comfy" --checkpoint "$checkpoint" --out "$out" \
            --name "$name" $expect -- "${common[@]}" $flags >"$work/$name.log" 2>&1; then
        grep '^memory_modes\[' "$work/$name.log" || true
        results+=("$out")
    else
        status=$?
        echo "memory_modes[$name]: FAILED (exit $status); last lines of $work/$name.log:" >&2
        tail -25 "$work/$name.log" >&2
        failed+=("$name")
    fi
done

if [ ! -f "$work/reference.pt" ]; then
    echo "memory_modes: the reference run failed; nothing to compare" >&2
    exit 1
fi
compare_status=0
"$python" "$here/gpu_memory_modes.py" --compare "${results[@]}" || compare_status=$?
if [ "${#failed[@]}" -gt 0 ]; then
    echo "memory_modes: modes that did not run to the end: ${failed[*]}" >&2
    exit 1
fi
exit "$compare_status"
