"""Random-weight single-file checkpoints that ComfyUI's CheckpointLoaderSimple detects as a
given model config class, for real-server workflow tests. Never committed.

``sdxl`` (detected as ``SDXL``): ComfyUI picks the model class by matching a few UNet facts read
from the state dict's shapes (``comfy.supported_models.SDXL.unet_config``): model_channels 320,
linear projections in the transformers, transformer depths [0, 0, 2, 2, 10, 10] on the input
blocks, 2048-wide text context and 2816 ADM inputs. What it does not check is kept small: every
level has 320 channels (channel_mult [1, 1, 1]), the output blocks have no transformers and the
middle one has a single block (~125M UNet parameters instead of 2.6B). ComfyUI builds SDXL's
text encoders (CLIP-L and OpenCLIP bigG) from fixed configs, so they are full size (~817M
parameters; most of the ~2 GB fp16 file). The VAE is the SD/SDXL layout.

``sd3`` (detected as ``SD3``, a flow-matching model): an MMDiT of depth 2 (ComfyUI reads the
width as 64 x depth from the patch embedding, so 128 wide) with SD3's 16-channel latents,
2048-wide pooled vectors (CLIP-L 768 + CLIP-G 1280) and 4096-wide text context, a 96 x 96
position table (1536 px); the full-size CLIP-L and CLIP-G text encoders WITHOUT T5 (ComfyUI's
SD3 text encoder pads the context where T5 is absent, as it does for checkpoints that leave T5
out), and an SD3-layout 16-channel VAE. About 1.8 GB in fp16.

Built with ComfyUI's own classes in a subprocess and saved through ComfyUI's own
``state_dict_for_saving`` (so the key layout is the one real checkpoints have)::

    python tests/support/comfy_tiny_checkpoints.py {sdxl|sd3} OUT.safetensors --comfyui-root ROOT
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
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
#: the MMDiT layout ComfyUI's detector reads back from the shapes (model_detection.py)
TINY_SD3_DIT_CONFIG = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
    "adm_in_channels": 2048, "num_patches": 96 * 96, "pos_embed_max_size": 96,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
}


@dataclass(frozen=True)
class Kind:
    detected_as: str        # ComfyUI's model config class name the tests need
    builder_version: str    # bump when the layout changes (the cache key)
    filename: str


KINDS = {
    "sdxl": Kind("SDXL", "1", "prdp_tiny_sdxl.safetensors"),
    "sd3": Kind("SD3", "1", "prdp_tiny_sd3.safetensors"),
}

_LOCK = threading.Lock()


def build_tiny_checkpoint(kind: str, path, comfyui_root, timeout: float = 900) -> Path:
    """Write the ``kind`` checkpoint to ``path`` (atomically, verified by loading it back) in a
    subprocess, so ComfyUI's global state never enters the test process."""
    out = Path(path).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), kind, str(out), "--comfyui-root", str(comfyui_root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(out.parent))
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"building the tiny {kind} checkpoint failed (rc={proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out


def cached_tiny_checkpoint(kind: str, cache_dir, comfyui_root) -> Path:
    """The ``kind`` checkpoint, built once per test session and ComfyUI version under
    ``cache_dir`` (env ``COMFY_HARNESS_CACHE_DIR`` keeps it across sessions)."""
    root = Path(comfyui_root)
    spec = KINDS[kind]
    base = Path(os.environ.get("COMFY_HARNESS_CACHE_DIR") or cache_dir)
    target = (base / f"tiny_{kind}_v{spec.builder_version}" / f"comfyui-{comfy_harness.comfyui_version(root)}"
              / spec.filename)
    with _LOCK:
        if not target.is_file():
            build_tiny_checkpoint(kind, target, root)
        return target


def _load_problems(messages) -> list:
    """ComfyUI's warnings about missing or left-over keys among log `messages`."""
    return [m[:300] for m in messages if "missing" in m.lower() or "left over" in m.lower()]


def _sdxl_parts():
    """(base model, CLIP, VAE state dict) of the tiny SDXL."""
    import torch
    import comfy.sd
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    model_config = comfy.supported_models.SDXL(dict(TINY_SDXL_UNET_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    base_model = model_config.get_model({})
    comfy_harness.reset_all_parameters(base_model.diffusion_model)
    clip = comfy.sd.CLIP(model_config.clip_target(), parameters=0, model_options={"dtype": torch.float32})
    comfy_harness.reset_all_parameters(clip.cond_stage_model)
    vae = AutoencoderKL(ddconfig=dict(comfy_harness.SD_VAE_DDCONFIG), embed_dim=4)
    comfy_harness.reset_all_parameters(vae)
    return base_model, clip, vae.state_dict()


def _sd3_parts():
    """(base model, CLIP-L + CLIP-G without T5, 16-channel VAE state dict) of the tiny SD3."""
    import torch
    import comfy.sd
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.text_encoders.sd3_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL

    model_config = comfy.supported_models.SD3(dict(TINY_SD3_DIT_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    base_model = model_config.get_model({})
    with torch.no_grad():   # every tensor seeded first: pos_embed is torch.empty, RMSNorm weights are not nn layers
        for tensor in list(base_model.diffusion_model.parameters()) + list(base_model.diffusion_model.buffers()):
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.02)
    comfy_harness.reset_all_parameters(base_model.diffusion_model)
    target = comfy.supported_models_base.ClipTarget(
        comfy.text_encoders.sd3_clip.SD3Tokenizer,
        comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=False))
    clip = comfy.sd.CLIP(target, parameters=0, model_options={"dtype": torch.float32})
    comfy_harness.reset_all_parameters(clip.cond_stage_model)
    vae = AutoencoderKL(ddconfig={**comfy_harness.SD_VAE_DDCONFIG, "z_channels": 16}, embed_dim=16)
    comfy_harness.reset_all_parameters(vae)
    vae_state = {k: v for k, v in vae.state_dict().items() if not k.startswith(("quant_conv", "post_quant_conv"))}
    return base_model, clip, vae_state


def _build_here(kind: str, out: Path, comfyui_root: Path) -> None:
    started = time.time()
    spec = KINDS[kind]
    out.parent.mkdir(parents=True, exist_ok=True)
    comfy_harness.import_comfy_cpu(comfyui_root)
    import torch
    import comfy.sd

    torch.manual_seed(20240614)
    base_model, clip, vae_state = {"sdxl": _sdxl_parts, "sd3": _sd3_parts}[kind]()
    state = comfy_harness.checkpoint_state_dict(base_model, clip.get_sd(), vae_state)
    del clip
    tmp = comfy_harness.write_fp16_checkpoint(state, out, {
        "prdp_test_fixture": f"random weights, small {spec.detected_as} layout; not a real model",
        "builder_version": spec.builder_version})
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
    if detected != spec.detected_as or clip_loaded is None or vae_loaded is None:
        problems.append(f"ComfyUI detected {detected}, clip={clip_loaded is not None}, "
                        f"vae={vae_loaded is not None}; expected {spec.detected_as} with both")
    problems += _load_problems(capture.messages)
    if problems:
        tmp.unlink(missing_ok=True)
        raise RuntimeError("; ".join(problems))
    os.replace(tmp, out)
    params = sum(p.numel() for p in base_model.diffusion_model.parameters())
    print(json.dumps({"path": str(out), "bytes": out.stat().st_size, "diffusion_model_params": params,
                      "build_s": round(built - started, 1), "total_s": round(time.time() - started, 1)}))


def main(argv) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--comfyui-root", type=Path, required=True)
    args = parser.parse_args(argv)
    _build_here(args.kind, args.out.absolute(), args.comfyui_root.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
