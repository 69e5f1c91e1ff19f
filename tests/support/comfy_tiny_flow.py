"""Tiny random-weight flow-matching models built through ComfyUI's own classes, in-process.

Like comfy_tiny_families.py for the UNets: each model is built as
`comfy.sd.load_state_dict_guess_config` builds a detected checkpoint, with a small layout --
the family's `comfy.supported_models` config (its sampling settings: SD3 shift 3.0, Flux's
ModelSamplingFlux shift 1.15) -> `get_model` (the `model_base` class: SD3 / Flux, model type
FLOW / FLUX, so CONST model sampling) -> `ModelPatcher`. The text encoders are ComfyUI's own
arrangements (Flux: CLIP-L pooled + T5 hidden states; SD3: CLIP-L + zero CLIP-G pooled, hidden
states padded to 4096) with small CLIP-L / T5 configs behind ComfyUI's real tokenizers; the
VAE is ComfyUI's `VAE` of a random 16-channel AutoencoderKL state dict without quant convs
(the layout of the SD3 / Flux VAE).

Call `comfy_inprocess.import_comfy()` first.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from comfy_inprocess import SD_VAE, _reset_parameters
from comfy_tiny_families import Family, tiny_clip_config

#: Flux: hidden 64 (2 heads of 32 = 8 + 12 + 12 rotary axes), one double and one single block
FLUX_DIT = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
#: SD3's MMDiT: depth 2 (hidden 128, 2 heads), CLIP-L 32 + CLIP-G 1280 pooled, 4096-wide context
SD3_DIT = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=32 + 1280,
               context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
               num_patches=256, pos_embed_max_size=16, pos_embed_scaling_factor=None, x_block_self_attn_layers=[])
#: Qwen-Image's MMDiT: one block of 2 heads x 32, 32-wide text features (5D video-VAE latents)
QWEN_DIT = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12))
#: Chroma (Flux's blocks, modulations from an approximator instead of a pooled vector / guidance
#: embedding): hidden 64, one double and one single block; in/out 64 = 16 latent channels x 2x2
CHROMA_DIT = dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=32, hidden_size=64,
                  mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
                  patch_size=2, qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=32, n_layers=1)
#: HiDream's DiT: one double- and one single-stream block of 2 heads x 16, 32-wide text features
HIDREAM_DIT = dict(image_model="hidream", attention_head_dim=16, axes_dims_rope=[8, 4, 4], caption_channels=[32, 32],
                   max_resolution=[16, 16], in_channels=16, out_channels=16, llama_layers=[0, 0],
                   num_attention_heads=2, num_routed_experts=2, num_activated_experts=1, num_layers=1,
                   num_single_layers=1, patch_size=2, text_emb_dim=32)
#: Lumina2's NextDiT (Z-Image's architecture): one layer and one refiner of 2 heads x 32 (1 kv head)
LUMINA2_DIT = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, cap_feat_dim=32, n_layers=1,
                   n_refiner_layers=1, n_heads=2, n_kv_heads=1, multiple_of=16, qk_norm=True, axes_dims=[8, 12, 12],
                   axes_lens=[300, 64, 64])
TINY_T5 = {"d_ff": 64, "d_kv": 16, "d_model": 32, "decoder_start_token_id": 0, "dropout_rate": 0.0, "eos_token_id": 1,
           "dense_act_fn": "gelu_pytorch_tanh", "initializer_factor": 1.0, "is_encoder_decoder": True,
           "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": 1,
           "num_heads": 2, "num_layers": 1, "output_past": True, "pad_token_id": 0,
           "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "vocab_size": 32128}


def _tiny_t5(device="cpu", dtype=None, model_options={}):
    import comfy.sd1_clip
    import comfy.text_encoders.t5

    return comfy.sd1_clip.SDClipModel(device=device, layer="last", layer_idx=None, textmodel_json_config=dict(TINY_T5),
                                      dtype=dtype, special_tokens={"end": 1, "pad": 0},
                                      model_class=comfy.text_encoders.t5.T5,
                                      model_options={**model_options, "model_name": "t5xxl"})


class TinyFluxClip(torch.nn.Module):
    """`comfy.text_encoders.flux.FluxClipModel` (T5 hidden states, CLIP-L pooled) made small."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        import comfy.sd1_clip

        super().__init__()
        self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, return_projected_pooled=False,
                                                 textmodel_json_config=tiny_clip_config(32), model_options=model_options)
        self.t5xxl = _tiny_t5(device, dtype, model_options)
        self.dtypes = {dtype}


class TinySD3Clip(torch.nn.Module):
    """`comfy.text_encoders.sd3_clip.SD3ClipModel` with a small CLIP-L and without CLIP-G / T5
    (ComfyUI then pads: a zero CLIP-G pooled vector, hidden states to 4096)."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        import comfy.sd1_clip

        super().__init__()
        self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                 layer_norm_hidden_state=False, return_projected_pooled=False,
                                                 textmodel_json_config=tiny_clip_config(32), model_options=model_options)
        self.clip_g = None
        self.t5xxl = None
        self.dtypes = {dtype}


def _tiny_chroma_clip_class():
    """Chroma's text encoder as ComfyUI arranges it (`pixart_t5.PixArtT5XXL`: one T5 behind
    SD1ClipModel, hidden states only: no pooled vector and, by default, no attention mask) made
    small."""
    import comfy.sd1_clip

    def tiny_t5(device="cpu", dtype=None, model_options={}, **kwargs):
        return _tiny_t5(device, dtype, model_options)

    class TinyChromaClip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, name="t5xxl", clip_model=tiny_t5, model_options=model_options)

    return TinyChromaClip


def _bind(tiny_class, comfy_class):
    for name in ("set_clip_options", "reset_clip_options", "encode_token_weights", "load_sd"):
        setattr(tiny_class, name, getattr(comfy_class, name))


def _flux_config():
    """FLUX_DIT plus the fields this ComfyUI's FluxParams has beyond it (newer trees)."""
    import comfy.ldm.flux.model

    config = dict(FLUX_DIT)
    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    if "txt_ids_dims" in fields:
        config["txt_ids_dims"] = []
    return config


def _chroma_config():
    """CHROMA_DIT plus the fields this ComfyUI's ChromaParams has beyond it (0.33: as its model
    detection sets them for Chroma)."""
    import comfy.ldm.chroma.model

    config = dict(CHROMA_DIT)
    fields = {f.name for f in dataclasses.fields(comfy.ldm.chroma.model.ChromaParams)}
    config.update({k: v for k, v in (("txt_ids_dims", []), ("vec_in_dim", None)) if k in fields})
    return config


def _vae16(seed: int):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    torch.manual_seed(seed)
    module = _reset_parameters(AutoencoderKL(ddconfig={**SD_VAE, "z_channels": 16}, embed_dim=16))
    state = {k: v.clone() for k, v in module.state_dict().items() if not k.startswith(("quant_conv", "post_quant_conv"))}
    return comfy.sd.VAE(sd=state)


class TinyQwenStandInClip(torch.nn.Module):
    """A stand-in text encoder for the tiny Qwen-Image: ComfyUI's Qwen2.5-VL encoder always
    builds its full-size vision tower (far too big here), so a small CLIP-L (hidden states
    only, no pooled vector, as Qwen-Image's encoder gives) feeds the 32-wide text features."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        import comfy.sd1_clip

        super().__init__()
        self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, layer="hidden", layer_idx=-2,
                                                 textmodel_json_config=tiny_clip_config(32), model_options=model_options)
        self.dtypes = {dtype}

    def set_clip_options(self, options):
        self.clip_l.set_clip_options(options)

    def reset_clip_options(self):
        self.clip_l.reset_clip_options()

    def encode_token_weights(self, token_weight_pairs):
        hidden, _pooled = self.clip_l.encode_token_weights(token_weight_pairs["l"])
        return hidden, None

    def load_sd(self, sd):
        return self.clip_l.load_sd(sd)


class TinyMaskedStandInClip(TinyQwenStandInClip):
    """A stand-in for Lumina2's Gemma encoder (full size in ComfyUI), shaped as it gives its
    output: hidden states of the prompt's own tokens only (the small CLIP-L's, up to its first
    end token) and an `attention_mask` extra over them, which Lumina2 reads its token count from."""

    END_TOKEN = 49407

    def encode_token_weights(self, token_weight_pairs):
        hidden, _ = super().encode_token_weights(token_weight_pairs)
        tokens = [pair[0] for pair in token_weight_pairs["l"][0]]
        count = tokens.index(self.END_TOKEN, 1) + 1
        return hidden[:, :count], None, {"attention_mask": torch.ones(1, count, dtype=torch.long)}


def _wan_vae(seed: int):
    """ComfyUI's VAE of a random Wan 2.1 VAE state dict (Qwen-Image's VAE: 16 channels, 5D latents)."""
    import comfy.ldm.wan.vae
    import comfy.sd

    torch.manual_seed(seed)
    module = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                      temperal_downsample=[False, True, True], dropout=0.0)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            parameter.fill_(1.0) if name.endswith("gamma") else parameter.normal_(0.0, 0.02)
    _reset_parameters(module)
    return comfy.sd.VAE(sd={k: v.clone() for k, v in module.state_dict().items()})


def _flow_model(config_name: str, unet: dict, seed: int):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = getattr(comfy.supported_models, config_name)(dict(unet))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "")
    torch.manual_seed(seed)
    with torch.no_grad():   # parameters outside torch.nn modules: RMSNorm scales (Flux)
        for name, parameter in model.diffusion_model.named_parameters():
            parameter.fill_(1.0) if name.endswith(".scale") else parameter.normal_(0.0, 0.02)
        for name, buffer in model.diffusion_model.named_buffers():
            if buffer.is_floating_point():   # SD3's pos_embed is torch.empty: whatever memory held, NaN at times
                buffer.normal_(0.0, 0.02)
    _reset_parameters(model.diffusion_model)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def _clip(tokenizer_class, clip_class, seed: int):
    import comfy.sd
    import comfy.supported_models_base

    torch.manual_seed(seed)
    clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer_class, clip_class), parameters=2_000_000)
    with torch.no_grad():   # parameters outside torch.nn modules (T5's layer norm and attention bias, projections)
        for name, parameter in clip.cond_stage_model.named_parameters():
            if "t5xxl" in name:
                parameter.fill_(1.0) if "layer_norm" in name else parameter.normal_(0.0, 0.5)
            else:
                parameter.normal_(0.0, 0.05)
    _reset_parameters(clip.cond_stage_model)
    return clip


@functools.lru_cache(maxsize=None)
def tiny_flow_family(kind: str, seed: int = 0) -> Family:
    """`kind`: "flux" (guidance-distilled Flux.1-dev layout), "sd3" (SD3's MMDiT), "qwen-image"
    (Qwen-Image's MMDiT with a stand-in text encoder, see TinyQwenStandInClip), "chroma"
    (ComfyUI's Chroma with its T5 arrangement), "lumina2" (Lumina2's NextDiT, Z-Image's
    architecture, with a stand-in masked encoder: TinyMaskedStandInClip) or "hidream" (HiDream's DiT, for its refusal: the
    Flux text encoder stands in, HiDream's own needs a Llama)."""
    import comfy.sd1_clip
    import comfy.text_encoders.flux
    import comfy.text_encoders.pixart_t5
    import comfy.text_encoders.sd3_clip

    with torch.inference_mode():       # as CheckpointLoaderSimple runs inside the server
        if kind == "flux":
            _bind(TinyFluxClip, comfy.text_encoders.flux.FluxClipModel)
            model = _flow_model("Flux", _flux_config(), seed)
            clip = _clip(comfy.text_encoders.flux.FluxTokenizer, TinyFluxClip, seed + 1)
        elif kind == "qwen-image":
            model = _flow_model("QwenImage", QWEN_DIT, seed)
            clip = _clip(comfy.sd1_clip.SD1Tokenizer, TinyQwenStandInClip, seed + 1)
            return Family(model, clip, _wan_vae(seed + 2), kind)
        elif kind == "lumina2":
            model = _flow_model("Lumina2", LUMINA2_DIT, seed)
            clip = _clip(comfy.sd1_clip.SD1Tokenizer, TinyMaskedStandInClip, seed + 1)
        elif kind == "chroma":
            model = _flow_model("Chroma", _chroma_config(), seed)
            clip = _clip(comfy.text_encoders.pixart_t5.PixArtTokenizer, _tiny_chroma_clip_class(), seed + 1)
        elif kind == "hidream":
            _bind(TinyFluxClip, comfy.text_encoders.flux.FluxClipModel)
            model = _flow_model("HiDream", HIDREAM_DIT, seed)
            clip = _clip(comfy.text_encoders.flux.FluxTokenizer, TinyFluxClip, seed + 1)
        elif kind == "sd3":
            _bind(TinySD3Clip, comfy.text_encoders.sd3_clip.SD3ClipModel)
            model = _flow_model("SD3", SD3_DIT, seed)
            clip = _clip(comfy.text_encoders.sd3_clip.SD3Tokenizer, TinySD3Clip, seed + 1)
        else:
            raise ValueError(f"unknown tiny flow family {kind!r}")
        vae = _vae16(seed + 2)
    return Family(model, clip, vae, kind)
