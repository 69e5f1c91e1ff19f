"""Tiny random-weight SDXL, SDXL v-prediction (zero-terminal-SNR) and SD2.x v-prediction
models built through ComfyUI's own classes, in-process on the CPU.

ComfyUI's model detection only recognises full-size layouts (SDXL: 320 channels and ten
transformer blocks per level), far too big for these tests, so the models are built the way
`comfy.sd.load_state_dict_guess_config` builds a detected one, with a small layout:
the family's `comfy.supported_models` config -> `get_model` (its `model_base` class, the
model type read from the state dict as for a real checkpoint: `v_pred` / `ztsnr` keys for
SDXL) -> `ModelPatcher`; the text encoders are ComfyUI's CLIP classes (`SDClipModel` in
SDXL's two-encoder arrangement, SD2's OpenCLIP-H arrangement) with small JSON configs, behind
ComfyUI's real tokenizers; the VAE is ComfyUI's `VAE` of a random SD-layout AutoencoderKL state dict (the layout
ComfyUI's VAE class builds for SD/SDXL).

Call `comfy_inprocess.import_comfy()` first.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

from comfy_inprocess import SD_VAE, _reset_parameters, comfyui_root

#: the tiny UNets: 64 channels, 2 levels, transformers at the second level (two blocks deep,
#: like SDXL's deeper levels), linear projections in the transformers as in SDXL/SD2
SDXL_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1, 1],
                 channel_mult=[1, 2], transformer_depth=[0, 2], transformer_depth_output=[0, 0, 2, 2],
                 transformer_depth_middle=1, num_head_channels=32, num_heads=-1, use_spatial_transformer=True,
                 use_linear_in_transformer=True, legacy=False, use_temporal_attention=False,
                 use_temporal_resblock=False, num_classes="sequential", context_dim=64, adm_in_channels=32 + 6 * 256)
SD2_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1, 1],
                channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
                transformer_depth_middle=1, use_spatial_transformer=True, use_linear_in_transformer=True,
                legacy=False, use_temporal_attention=False, use_temporal_resblock=False, context_dim=64,
                adm_in_channels=None)


def tiny_clip_config(hidden: int, *, act: str = "quick_gelu", eos: int = 49407) -> dict:
    """A CLIP text config of ComfyUI's JSON format (sd1_clip_config.json) made small."""
    config = json.loads((comfyui_root() / "comfy" / "sd1_clip_config.json").read_text())
    config.update(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3, num_attention_heads=2,
                  projection_dim=hidden, hidden_act=act, eos_token_id=eos)
    return config


class TinySDXLClip(torch.nn.Module):
    """SDXL's text encoders as `comfy.sdxl_clip.SDXLClipModel` arranges them (CLIP-L penultimate
    hidden state + CLIP-G penultimate hidden state concatenated, CLIP-G's projected pooled
    output), with small configs."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        import comfy.sd1_clip

        super().__init__()
        self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                 layer_norm_hidden_state=False, model_options=model_options,
                                                 textmodel_json_config=tiny_clip_config(32))
        self.clip_g = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                 textmodel_json_config=tiny_clip_config(32, act="gelu"),
                                                 special_tokens={"start": 49406, "end": 49407, "pad": 0},
                                                 layer_norm_hidden_state=False, return_projected_pooled=True,
                                                 model_options={**model_options, "model_name": "clip_g"})
        self.dtypes = {dtype}

    # ComfyUI's own SDXL behaviour for everything else
    import_methods = ("set_clip_options", "reset_clip_options", "encode_token_weights", "load_sd")


def _bind_sdxl_methods():
    import comfy.sdxl_clip

    for name in TinySDXLClip.import_methods:
        setattr(TinySDXLClip, name, getattr(comfy.sdxl_clip.SDXLClipModel, name))


def _tiny_sd2_clip_class():
    """SD2's `SD2ClipModel` with a small OpenCLIP-H-style encoder (penultimate layer, pad 0)."""
    import comfy.sd1_clip
    import comfy.text_encoders.sd2_clip

    def tiny_h(device="cpu", dtype=None, model_options={}):
        return comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, layer="hidden", layer_idx=-2,
                                          textmodel_json_config=tiny_clip_config(64, act="gelu"),
                                          special_tokens={"start": 49406, "end": 49407, "pad": 0},
                                          return_projected_pooled=True, model_options=model_options)

    def make(device="cpu", dtype=None, model_options={}, **kwargs):
        options = {**model_options, "clip_h_class": tiny_h}     # SD1ClipModel's own class override
        return comfy.text_encoders.sd2_clip.SD2ClipModel(device=device, dtype=dtype, model_options=options, **kwargs)
    return make


def _clip(tokenizer_class, clip_class, seed: int):
    import comfy.sd
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(tokenizer_class, clip_class)
    torch.manual_seed(seed)
    clip = comfy.sd.CLIP(target, parameters=1_000_000)
    _reset_parameters(clip.cond_stage_model)
    return clip


def _vae(seed: int):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    
    torch.manual_seed(seed)
    module = _reset_parameters(AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4))
    return comfy.sd.VAE(sd={k: v.clone() for k, v in module.state_dict().items()})


def _model(config_name: str, unet: dict, flags: dict, seed: int, model_type=None):
    """A ModelPatcher built as load_state_dict_guess_config builds a detected checkpoint."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = getattr(comfy.supported_models, config_name)(dict(unet))
    config.unet_config.update({k: unet[k] for k in ("num_head_channels", "num_heads") if k in unet})
    config.set_inference_dtype(torch.float32, None)
    if model_type is None:
        model = config.get_model(flags, "model.diffusion_model.")
    else:
        model = comfy.model_base.BaseModel(config, model_type=model_type)
    torch.manual_seed(seed)
    _reset_parameters(model.diffusion_model)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


@dataclass
class Family:
    model: object
    clip: object
    vae: object
    name: str


@functools.lru_cache(maxsize=None)
def tiny_family(kind: str, seed: int = 0) -> Family:
    """`kind`: "sdxl" (eps), "sdxl-v" (v-prediction + zero-terminal-SNR, as NoobAI-style
    checkpoints mark it with `v_pred` and `ztsnr` keys) or "sd2-v" (SD2.x 768-v)."""
    import comfy.model_base
    import comfy.sdxl_clip
    import comfy.text_encoders.sd2_clip

    with torch.inference_mode():       # as CheckpointLoaderSimple runs inside the server
        if kind in ("sdxl", "sdxl-v"):
            _bind_sdxl_methods()
            flags = {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])} if kind == "sdxl-v" else {}
            model = _model("SDXL", SDXL_UNET, flags, seed)
            clip = _clip(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClip, seed + 1)
        elif kind == "sd2-v":
            # SD20's detection reads v-prediction from the weights' statistics (a real 768-v
            # checkpoint gives V_PREDICTION there); the tiny model gets that type directly
            model = _model("SD20", SD2_UNET, {}, seed, model_type=comfy.model_base.ModelType.V_PREDICTION)
            clip = _clip(comfy.text_encoders.sd2_clip.SD2Tokenizer, _tiny_sd2_clip_class(), seed + 1)
        else:
            raise ValueError(f"unknown tiny family {kind!r}")
        vae = _vae(seed + 2)
    return Family(model, clip, vae, kind)
