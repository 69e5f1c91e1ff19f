"""A random-weight single-file SDXL checkpoint that ComfyUI's CheckpointLoaderSimple detects
as ``SDXL`` (not a distilled variant), for real-server workflow tests. Never committed.

ComfyUI picks the model class by matching a few UNet facts read from the state dict's shapes
(``comfy.supported_models.SDXL.unet_config``): model_channels 320, linear projections in the
transformers, transformer depths [0, 0, 2, 2, 10, 10] on the input blocks, 2048-wide text
context and 2816 ADM inputs. What it does not check is kept small: every level has 320
channels (channel_mult [1, 1, 1]), the output blocks have no transformers and the middle one
has a single block (~125M UNet parameters instead of 2.6B). ComfyUI builds SDXL's text
encoders (CLIP-L and OpenCLIP bigG) from fixed configs, so they are full size (~817M
parameters; most of the ~2 GB fp16 file). The VAE is the SD/SDXL layout.

Built with ComfyUI's own classes in a subprocess and saved through ComfyUI's own
``state_dict_for_saving`` (so the key layout is the one real SDXL checkpoints have)::

    python tests/comfy_tiny_sdxl_checkpoint.py OUT.safetensors --comfyui-root ROOT
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import comfy_harness  # noqa: E402
from comfy_inprocess import LogCapture  # noqa: E402

#: the UNet layout; the keys ComfyUI's SDXL detector checks are the real SDXL's
TINY_SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 1, 1],
    "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0] * 9,
    "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False,
    "use_linear_in_transformer": True, "context_dim": 2048, "num_classes": "sequential",
    "adm_in_channels": 2816, "num_head_channels": 64, "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
TINY_SDXL_BUILDER_VERSION = "1"
TINY_SDXL_FILENAME = "prdp_tiny_sdxl.safetensors"
#: what the tests need from it (ComfyUI's model config class name)
DETECTED_AS = "SDXL"

_CACHE: dict[str, Path] = {}
_LOCK = threading.Lock()


def build_tiny_sdxl_checkpoint(path, comfyui_root, timeout: float = 900) -> Path:
    """Write the checkpoint to ``path`` (atomically, verified by loading it back) in a
    subprocess, so ComfyUI's global state never enters the test process."""
    out = Path(path).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), str(out), "--comfyui-root", str(comfyui_root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(out.parent))
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"building the tiny SDXL checkpoint failed (rc={proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out


def cached_tiny_sdxl_checkpoint(cache_dir, comfyui_root) -> Path:
    """The checkpoint, built once per test session and ComfyUI version under ``cache_dir``
    (env ``COMFY_HARNESS_CACHE_DIR`` keeps it across sessions)."""
    root = Path(comfyui_root)
    base = Path(os.environ.get("COMFY_HARNESS_CACHE_DIR") or cache_dir)
    target = (base / f"tiny_sdxl_v{TINY_SDXL_BUILDER_VERSION}" / f"comfyui-{comfy_harness.comfyui_version(root)}"
              / TINY_SDXL_FILENAME)
    with _LOCK:
        if not target.is_file():
            build_tiny_sdxl_checkpoint(target, root)
        _CACHE[str(target)] = target
        return target


def _load_problems(messages) -> list:
    """ComfyUI's warnings about missing or left-over keys among log `messages`."""
    return [m[:300] for m in messages if "missing" in m.lower() or "left over" in m.lower()]


def _build_here(out: Path, comfyui_root: Path) -> None:
    started = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    comfy_harness._import_comfy_cpu(comfyui_root)
    import torch
    import comfy.sd
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    torch.manual_seed(20240614)
    model_config = comfy.supported_models.SDXL(dict(TINY_SDXL_UNET_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    base_model = model_config.get_model({})
    comfy_harness._reset_all_parameters(base_model.diffusion_model)
    clip = comfy.sd.CLIP(model_config.clip_target(), parameters=0, model_options={"dtype": torch.float32})
    comfy_harness._reset_all_parameters(clip.cond_stage_model)
    vae = AutoencoderKL(ddconfig=dict(comfy_harness.SD_VAE_DDCONFIG), embed_dim=4)
    comfy_harness._reset_all_parameters(vae)

    state = comfy_harness.checkpoint_state_dict(base_model, clip.get_sd(), vae.state_dict())
    del clip
    tmp = comfy_harness.write_fp16_checkpoint(state, out, {
        "prdp_test_fixture": "random weights, small SDXL layout; not a real model",
        "builder_version": TINY_SDXL_BUILDER_VERSION})
    del state
    built = time.time()

    capture = LogCapture()
    logging.getLogger().addHandler(capture)
    try:
        patcher, clip_loaded, vae_loaded, _ = comfy.sd.load_checkpoint_guess_config(str(tmp))
    finally:
        logging.getLogger().removeHandler(capture)
    detected = type(patcher.model.model_config).__name__
    problems = []
    if detected != DETECTED_AS or clip_loaded is None or vae_loaded is None:
        problems.append(f"ComfyUI detected {detected}, clip={clip_loaded is not None}, "
                        f"vae={vae_loaded is not None}; expected {DETECTED_AS} with both")
    problems += _load_problems(capture.messages)
    if problems:
        tmp.unlink(missing_ok=True)
        raise RuntimeError("; ".join(problems))
    os.replace(tmp, out)
    unet_params = sum(p.numel() for p in base_model.diffusion_model.parameters())
    print(json.dumps({"path": str(out), "bytes": out.stat().st_size, "unet_params": unet_params,
                      "build_s": round(built - started, 1), "total_s": round(time.time() - started, 1)}))


def main(argv) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--comfyui-root", type=Path, required=True)
    args = parser.parse_args(argv)
    _build_here(args.out.absolute(), args.comfyui_root.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
