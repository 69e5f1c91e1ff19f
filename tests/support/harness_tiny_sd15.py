"""A random-weight, single-file checkpoint that ComfyUI's ``CheckpointLoaderSimple`` detects as
SD1.5, built with ComfyUI's own model classes in a subprocess (never committed), once per test
session and ComfyUI version (``COMFY_HARNESS_CACHE_DIR`` keeps it across sessions).

Run as a script to build one by hand:
``python tests/support/harness_tiny_sd15.py OUT.safetensors --comfyui-root ROOT``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness_trees import comfyui_missing_reason, comfyui_version, find_comfyui_root

#: UNet layout: two levels of 320 channels, cross-attention at the half-resolution level
#: (and the middle block) only. ComfyUI's SD1.5 detector checks model_channels=320,
#: context_dim=768, no linear-in-transformer, no ADM, no temporal attention. ~36.7M params.
TINY_SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [1, 1], "channel_mult": [1, 1],
    "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
    "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False,
    "use_linear_in_transformer": False, "context_dim": 768, "adm_in_channels": None,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
#: The SD1.x VAE layout ComfyUI assumes for a single-file checkpoint.
SD_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
TINY_SD15_BUILDER_VERSION = "1"
TINY_SD15_FILENAME = "prdp_tiny_sd15.safetensors"

_CHECKPOINT_CACHE: dict[str, Path] = {}
_CHECKPOINT_LOCK = threading.Lock()


def build_tiny_sd15_checkpoint(path: str | os.PathLike, comfyui_root: str | os.PathLike | None = None,
                               python: str | None = None, verify: bool = True, timeout: float = 600) -> Path:
    """Write a random-weight SD1.5-detected checkpoint to ``path`` (atomically) and return it.

    Runs ComfyUI's model classes in a subprocess (so ComfyUI's global state never leaks into
    the test process): the tiny UNet above, the full CLIP-L text encoder (ComfyUI builds
    SD1.5's text encoder from a fixed config, so a smaller one is not loadable) and the SD
    VAE, every layer re-initialised and checked finite, stored in fp16 (~490 MB). With
    ``verify`` the file is loaded back through ``comfy.sd.load_checkpoint_guess_config`` and
    must come back as SD15 with a CLIP and a VAE.
    """
    root = Path(comfyui_root) if comfyui_root else find_comfyui_root()
    if root is None:
        raise FileNotFoundError(comfyui_missing_reason())
    out = Path(path).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python or sys.executable, str(Path(__file__).resolve()), "build-tiny-sd15", str(out),
           "--comfyui-root", str(root)]
    if not verify:
        cmd.append("--no-verify")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(out.parent))
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"building the tiny SD1.5 checkpoint failed (rc={proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out


def cached_tiny_sd15_checkpoint(cache_dir: str | os.PathLike, comfyui_root: str | os.PathLike | None = None) -> Path:
    """The tiny checkpoint, built once per process (test session) under ``cache_dir``.

    Each ComfyUI version builds (and verifies) its own file, so the builder is exercised on
    every tree tested. Env ``COMFY_HARNESS_CACHE_DIR`` overrides ``cache_dir`` to keep it
    across sessions.
    """
    root = Path(comfyui_root) if comfyui_root else find_comfyui_root()
    if root is None:
        raise FileNotFoundError(comfyui_missing_reason())
    base = Path(os.environ.get("COMFY_HARNESS_CACHE_DIR") or cache_dir)
    target = base / f"tiny_sd15_v{TINY_SD15_BUILDER_VERSION}" / f"comfyui-{comfyui_version(root)}" / TINY_SD15_FILENAME
    key = f"{root}|{target}"
    with _CHECKPOINT_LOCK:
        cached = _CHECKPOINT_CACHE.get(key)
        if cached is not None and cached.is_file():
            return cached
        if not target.is_file():
            build_tiny_sd15_checkpoint(target, root)
        _CHECKPOINT_CACHE[key] = target
        return target


def import_comfy_cpu(comfyui_root: Path):
    """Import ComfyUI's model code in this process, CPU only, without parsing our argv."""
    sys.path.insert(0, str(comfyui_root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def reset_all_parameters(module) -> None:
    """Initialise every layer: ComfyUI's ops classes turn ``reset_parameters`` into a no-op,
    so call the torch.nn implementation each layer inherits."""
    for sub in module.modules():
        for cls in type(sub).__mro__:
            if cls.__module__.startswith("torch.nn") and "reset_parameters" in cls.__dict__:
                cls.reset_parameters(sub)
                break


def checkpoint_state_dict(base_model, clip_state_dict: dict, vae_state_dict: dict) -> dict:
    """``BaseModel.state_dict_for_saving`` on either signature: before 2026-02 it took
    ``(clip_state_dict, vae_state_dict, ...)`` and read the UNet itself; since then it takes
    ``(unet_state_dict, clip_state_dict, vae_state_dict, ...)``. Passed by keyword either way."""
    import inspect

    parameters = inspect.signature(base_model.state_dict_for_saving).parameters
    parts = {"clip_state_dict": clip_state_dict, "vae_state_dict": vae_state_dict}
    if "unet_state_dict" in parameters:
        parts["unet_state_dict"] = base_model.diffusion_model.state_dict()
    missing = [name for name in parts if name not in parameters]
    if missing:
        raise TypeError(f"this ComfyUI's state_dict_for_saving{inspect.signature(base_model.state_dict_for_saving)} "
                        f"takes none of {missing}; update comfy_harness.checkpoint_state_dict")
    return base_model.state_dict_for_saving(**parts)


def write_fp16_checkpoint(state: dict, out: Path, metadata: dict) -> Path:
    """Write a checkpoint state dict, every tensor checked finite, floats as fp16, to a
    temporary file beside ``out`` (returned; the caller verifies it and moves it in place)."""
    import torch
    import comfy.utils

    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RuntimeError(f"non-finite tensors after initialisation: {bad[:10]}")
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    tmp = out.with_name(f".tmp{os.getpid()}.{out.name}")  # keeps the .safetensors suffix ComfyUI checks
    comfy.utils.save_torch_file(half, str(tmp), metadata=metadata)
    return tmp


def _build_tiny_sd15_here(out: Path, comfyui_root: Path, verify: bool) -> None:
    started = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    import_comfy_cpu(comfyui_root)
    import torch
    import comfy.sd
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    torch.manual_seed(20240613)
    model_config = comfy.supported_models.SD15(TINY_SD15_UNET_CONFIG)
    model_config.set_inference_dtype(torch.float32, None)
    base_model = model_config.get_model({})
    reset_all_parameters(base_model.diffusion_model)
    clip = comfy.sd.CLIP(model_config.clip_target(), parameters=0, model_options={"dtype": torch.float32})
    reset_all_parameters(clip.cond_stage_model)
    vae = AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    reset_all_parameters(vae)

    state = checkpoint_state_dict(base_model, clip.get_sd(), vae.state_dict())
    tmp = write_fp16_checkpoint(state, out, {"prdp_test_fixture": "random weights, tiny SD1.5 layout; not a real model",
                                             "builder_version": TINY_SD15_BUILDER_VERSION})
    built = time.time()
    if verify:
        patcher, clip_loaded, vae_loaded, _ = comfy.sd.load_checkpoint_guess_config(str(tmp))
        detected = type(patcher.model.model_config).__name__
        if detected != "SD15" or clip_loaded is None or vae_loaded is None:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"ComfyUI detected {detected}, clip={clip_loaded is not None}, "
                               f"vae={vae_loaded is not None}; expected SD15 with both")
    os.replace(tmp, out)
    unet_params = sum(p.numel() for p in base_model.diffusion_model.parameters())
    print(json.dumps({"path": str(out), "bytes": out.stat().st_size, "unet_params": unet_params,
                      "build_s": round(built - started, 1), "total_s": round(time.time() - started, 1)}))


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-tiny-sd15", help="write a random-weight SD1.5-detected checkpoint")
    build.add_argument("out", type=Path)
    build.add_argument("--comfyui-root", type=Path, default=None)
    build.add_argument("--no-verify", action="store_true")
    args = parser.parse_args(argv)
    root = args.comfyui_root or find_comfyui_root()
    if root is None:
        print(comfyui_missing_reason(), file=sys.stderr)
        return 2
    _build_tiny_sd15_here(args.out.absolute(), root.resolve(), verify=not args.no_verify)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
