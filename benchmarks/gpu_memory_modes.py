"""One mode of benchmarks/gpu_memory_modes.sh: a few LoRA training steps through ComfyBackend on a
CUDA GPU under the ComfyUI flags given after `--`, recording the gradients.

ComfyUI is initialised by importing its main.py with those flags (what the server does at
startup, dynamic VRAM included: comfy-aimdo, ModelPatcherDynamic), without starting the server.
The model is a random-weight SD1.5-detected checkpoint loaded as CheckpointLoaderSimple loads it
(under inference mode); training runs in a fresh thread with inference mode off, as the job does.

    python benchmarks/gpu_memory_modes.py --comfyui-root R --checkpoint C --out F.pt [--expect-dynamic] -- FLAGS
    python benchmarks/gpu_memory_modes.py --compare REF.pt RUN.pt ...     (exit 1 when a run differs)

With `--cpu` among the flags a mode runs on the CPU: that only tries the script out.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
BATCH = 2
LATENT = (4, 32, 32)
TIMESTEPS = (250, 750)
RANK = 4
REL_TOLERANCE = 1e-4      # fp32, TF32 off: modes differ only by summation order, if at all


def init_comfyui(root: Path, flags: list[str]):
    """Import ComfyUI's main.py with `flags` as its command line (no server is started)."""
    os.chdir(root)
    sys.path.insert(0, str(root))
    sys.argv = [str(root / "main.py"), *flags]
    import main  # noqa: F401  (ComfyUI's startup: args, dynamic VRAM, model management)
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False


def fixed_inputs(device):
    import torch

    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(BATCH, *LATENT, generator=generator)
    context = torch.randn(BATCH, 77, 768, generator=generator)
    target = torch.randn(BATCH, *LATENT, generator=generator)
    return x.to(device), {"context": context.to(device)}, target.to(device)


def train_steps(backend) -> dict:
    """STEPS AdamW steps of a fixed loss on eps (LoRA on) and eps of the base (LoRA off)."""
    import torch

    generator = torch.Generator().manual_seed(99)
    params = backend.trainable_parameters()
    with torch.no_grad():
        for p in params:     # both factors non-zero, so every gradient depends on the weights
            p.copy_((torch.randn(p.shape, generator=generator) * 0.05).to(p.device, p.dtype))
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    x, cond, target = fixed_inputs(backend.device)
    t = torch.tensor(TIMESTEPS)
    record = {"grads": [], "losses": []}
    backend.prepare_for_training()
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        eps = backend.predict_eps(x, t, cond)
        loss = (eps.float() * target).mean()
        loss.backward()
        record["grads"].append([p.grad.detach().double().cpu().clone() for p in params])
        record["losses"].append(float(loss.detach()))
        optimizer.step()
    with torch.no_grad(), backend.adapters_disabled():
        record["base_eps"] = backend.predict_eps(x, t, cond).double().cpu()
    record["lora"] = [p.detach().double().cpu().clone() for p in params]
    return record


def run_mode(args) -> int:
    init_comfyui(Path(args.comfyui_root), args.flags)
    import importlib

    import torch
    import comfy.model_management
    import comfy.sd

    sys.path.insert(0, str(REPO_ROOT))
    from comfyui_prdp.backends.comfyui.backend import ComfyBackend

    on_cpu = "--cpu" in args.flags       # only to try this script on a machine without a GPU
    if not on_cpu and (not torch.cuda.is_available() or comfy.model_management.get_torch_device().type != "cuda"):
        print("memory_modes: no CUDA device: this check needs an NVIDIA GPU", file=sys.stderr)
        return 2
    try:                                     # ComfyUI >= 2026-01; older ones have no dynamic VRAM
        dynamic = bool(importlib.import_module("comfy.memory_management").aimdo_enabled)
    except ImportError:
        dynamic = False
    with torch.inference_mode():           # as CheckpointLoaderSimple runs in the prompt worker
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True,
                                                                     output_clip=True)
    patcher_kind = type(model).__name__
    print(f"memory_modes[{args.name}]: flags {' '.join(args.flags) or '(none)'}; dynamic VRAM "
          f"{'on' if dynamic else 'off'}; MODEL is a {patcher_kind}", flush=True)
    if args.expect_dynamic and not (dynamic and getattr(model, "is_dynamic", lambda: False)()):
        print(f"memory_modes[{args.name}]: dynamic VRAM was expected but is off (is comfy-aimdo installed and "
              "working? see ComfyUI's log above)", file=sys.stderr)
        return 3
    box = {}

    def body():
        try:
            with torch.inference_mode(False):
                backend = ComfyBackend(model, clip, vae, rank=RANK, seed=0, mixed_precision="no")
                try:
                    box["record"] = train_steps(backend)
                    patcher = backend.patcher
                    box["loaded"] = (patcher.loaded_size(), patcher.model_size())
                finally:
                    backend.release()
        except BaseException as error:  # noqa: BLE001  (reported below)
            box["error"] = error

    thread = threading.Thread(target=body, name="gpu-check-training")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    record = box["record"]
    loaded, size = box["loaded"]
    record.update(name=args.name, flags=args.flags, dynamic=dynamic, patcher=patcher_kind,
                  loaded_fraction=loaded / max(size, 1))
    finite = all(math.isfinite(v) for v in record["losses"]) and \
        all(torch.isfinite(g).all() for step in record["grads"] for g in step)
    torch.save(record, args.out)
    print(f"memory_modes[{args.name}]: losses {['%.6g' % v for v in record['losses']]}; UNet resident at the end: "
          f"{100 * record['loaded_fraction']:.0f}%; finite: {finite}", flush=True)
    return 0 if finite else 4


def relative_error(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(paths: list[str]) -> int:
    import torch

    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        print(f"memory_modes: no result file {', '.join(missing)}", file=sys.stderr)
        return 1
    reference = torch.load(paths[0], weights_only=True)
    worst_all = 0.0
    failed = []
    print(f"reference: {reference['name']} (flags {' '.join(reference['flags'])}), "
          f"UNet resident {100 * reference['loaded_fraction']:.0f}%")
    for path in paths[1:]:
        run = torch.load(path, weights_only=True)
        errors = [relative_error(g, r) for step, ref_step in zip(run["grads"], reference["grads"])
                  for g, r in zip(step, ref_step)]
        errors += [relative_error(p, r) for p, r in zip(run["lora"], reference["lora"])]
        errors.append(relative_error(run["base_eps"], reference["base_eps"]))
        worst = max(errors)
        worst_all = max(worst_all, worst)
        ok = worst <= REL_TOLERANCE and len(run["grads"]) == len(reference["grads"])
        print(f"{'ok  ' if ok else 'FAIL'} {run['name']:<16} dynamic={str(run['dynamic']):<5} {run['patcher']:<20} "
              f"resident {100 * run['loaded_fraction']:3.0f}%  worst relative error {worst:.2e} "
              f"(grads of {STEPS} steps, final LoRA, base eps)")
        if not ok:
            failed.append(run["name"])
    print(f"memory_modes: {'FAILED: ' + ', '.join(failed) if failed else 'all modes match the reference'} "
          f"(tolerance {REL_TOLERANCE:g}, worst {worst_all:.2e})")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--compare":
        return compare(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui-root", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--expect-dynamic", action="store_true")
    parser.add_argument("flags", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    args.flags = [f for f in args.flags if f != "--"]
    return run_mode(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
