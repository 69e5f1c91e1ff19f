"""Peak GPU memory of one training epoch of each consumer preset, at real model sizes, on a CPU.

Every model is built from its published config (written below; nothing is downloaded) under
PyTorch's fake tensors, so no weight is allocated. A dispatch mode (`LiveBytes`) sees every
tensor an op creates, counts the bytes of each live storage per device and records the peak.
The epoch runs the engine's own code where it can: the project's backend classes (peft LoRA
added by the backend, its dtypes, decode, CFG), `sampling.sample_trajectories` (trajectories
recorded on the CPU, base-model log-probs during sampling), `sampling.recorded_logprob` in
micro-batches of `train_batch_size` with the backward pass of the trainer's pass 2 (the first
update is on-policy, so pass 1 is skipped, as in `Trainer.minibatch_gradient`), AdamW over the
LoRA, and the reward's own `ModelReward.score` path (PickScore's CLIP ViT-H/14 in fp16 at the
reward batch size). Phases: encode (prompt encoding), sampling, decode, reward, update.

The GPU is stood in for by the `meta` device: autograd cannot run backward on fake CUDA
tensors without a CUDA device. So the CUDA-only choices of the engine are applied by this
script, read from the engine: the frozen weights' dtype (`frozen_weight_dtype` for cuda and
the preset's mixed_precision), T5's dtype (`_encoder_dtype`), VAE float32, LoRA float32.

Modelled design (the planned CLI after issue 20; printed above the table):
- weights loaded in the training dtype and cast before moving (no float32 copy on the GPU);
- text encoders on the GPU only while the epoch's prompts are encoded: on the CLI the backend's
  own placement (one encoder on the GPU at a time, each sent home when the next is called; the
  "encode" column); ComfyUI loads its whole CLIP for encoding;
- ComfyUI: the text encoders and VAE are unloaded by ComfyUI's model management while the
  diffusion model runs; the reward is loaded after ComfyUI's models are freed;
- Flux on the CLI: the frozen transformer stored in fp8 (e4m3), each layer's weight cast to
  bf16 for its forward (diffusers layerwise casting); in ComfyUI the fp8 checkpoint likewise;
- ComfyUI's LoRA is a weight wrapper: every layer's weight is cast / copied per forward and a
  LoRA target's weight is merged (W + up @ down), as backends/comfyui does (mimicked here on
  the diffusers models: ComfyUI is not importable here);
- CUDA autocast is not emulated: ops compute in the weights' dtype (autocast keeps norms and
  softmax in float32, a small transient extra); attention is a fused kernel (flash attention
  for fp16/bf16, memory-efficient attention for float32), as PyTorch's SDPA picks on a GPU.

Not modelled: allocator fragmentation and the caching allocator's block rounding, cuDNN /
cuBLAS workspaces, the CUDA context (~0.5 GB; CUDA_CONTEXT_GB is added and printed apart),
ComfyUI's own reserves, kernels' internal scratch memory.

Usage: python benchmarks/memory_budget.py [--only PRESET ...] [--budget PRESET=GB ...] [--flat-steps T]
Exit status 1 when any preset is over its budget.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
import weakref
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from comfyui_prdp import config as prdp_config  # noqa: E402
from comfyui_prdp.backends import diffusers_backend  # noqa: E402
from comfyui_prdp.policies import policy_for  # noqa: E402
from comfyui_prdp.sampling import (broadcast_row, index_cond, join_trajectories, recorded_logprob,  # noqa: E402
                                   repeat_cond, sample_trajectories)

GB = 1024 ** 3
GPU = torch.device("meta")          # the GPU stand-in (see the module docstring)
CUDA_CONTEXT_GB = 0.5
PHASES = ("encode", "sampling", "decode", "reward", "update")

# ----------------------------------------------------------------------------- the byte counter


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every live tensor storage per device and the peaks.

    Each storage an op returns is counted once (views share it) and uncounted when it is
    freed (a weak reference to the storage; PyTorch keeps one Python object per storage).
    `phase(name)` starts a phase: its peak starts at the bytes live then."""

    def __init__(self):
        super().__init__()
        self.live: Dict[str, int] = {}
        self.peak: Dict[str, int] = {}
        self.phase_peaks: Dict[str, Dict[str, int]] = {}
        self._current: Optional[str] = None
        self._seen: Dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out

    def track(self, tensor: torch.Tensor) -> None:
        """Count a tensor made outside this mode (e.g. before it was entered)."""
        self._track(tensor)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        known = self._seen.get(key)
        if known is not None and known() is storage:
            return
        device, size = _device_key(tensor.device), storage.nbytes()
        self._seen[key] = weakref.ref(storage, lambda _, k=key, d=device, n=size: self._free(k, d, n))
        self.live[device] = self.live.get(device, 0) + size
        self._raise_peaks(device)

    def _free(self, key: int, device: str, size: int) -> None:
        self._seen.pop(key, None)
        self.live[device] -= size

    def _raise_peaks(self, device: str) -> None:
        now = self.live[device]
        if now > self.peak.get(device, 0):
            self.peak[device] = now
        if self._current is not None:
            peaks = self.phase_peaks[self._current]
            if now > peaks.get(device, 0):
                peaks[device] = now

    def phase(self, name: Optional[str]) -> None:
        self._current = name
        if name is not None:
            self.phase_peaks[name] = dict(self.live)

    def gpu(self, table: Dict[str, int]) -> int:
        return table.get(_device_key(GPU), 0)


def _device_key(device: torch.device) -> str:
    return "gpu" if device.type == GPU.type else device.type


# ----------------------------------------------------------------------------- the fake GPU


def _apply_without_swap(self, fn, recurse=True):
    """Module._apply for fake tensors: new Parameters instead of swap_tensors, which refuses
    tensors that the fake mode holds weak references to."""
    if recurse:
        for child in self.children():
            child._apply(fn)
    for key, param in self._parameters.items():
        if param is not None:
            with torch.no_grad():
                applied = fn(param)
            if applied is not param:
                self._parameters[key] = torch.nn.Parameter(applied, param.requires_grad)
    for key, buffer in self._buffers.items():
        if buffer is not None:
            self._buffers[key] = fn(buffer)
    return self


def fused_attention(original):
    """F.scaled_dot_product_attention as a GPU runs it: flash attention (fp16/bf16, head dim
    <= 256) or memory-efficient attention, never a materialised score matrix."""
    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device != GPU or attn_mask is not None or kwargs or query.dim() != 4:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
        if query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, None, True, dropout_p, is_causal, scale=scale)[0]
    return attention


@contextlib.contextmanager
def fake_gpu(meter: LiveBytes):
    """The byte counter, fused attention and fake-safe module moves, and a FakeTensorMode to
    build models in (`build(fn)`). Models are fake; the engine's small CPU tensors (schedules,
    step indices, noise) stay real, so its control flow on them runs as it does on a GPU;
    ops that meet a fake tensor run in the fake mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    patches = [(torch.nn.Module, "_apply", _apply_without_swap),
               (F, "scaled_dot_product_attention", fused_attention(F.scaled_dot_product_attention))]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        with meter:
            yield fake_mode
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


# ----------------------------------------------------------------------------- published configs
# diffusers / transformers config.json values of the released models (architecture fields only)

SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=64)
SDXL_UNET = dict(
    addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], in_channels=4, out_channels=4,
    layers_per_block=2, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, norm_num_groups=32)
SD35_MEDIUM = dict(
    attention_head_dim=64, caption_projection_dim=1536, dual_attention_layers=list(range(13)), in_channels=16,
    joint_attention_dim=4096, num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2,
    pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm", sample_size=128)
FLUX_DEV = dict(
    attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096, num_attention_heads=24,
    num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768, axes_dims_rope=[16, 56, 56])
VAE_SD = dict(
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
VAE_SDXL = dict(VAE_SD, sample_size=1024, scaling_factor=0.13025)
VAE_SD3 = dict(VAE_SD, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False, sample_size=1024)
VAE_FLUX = dict(VAE_SD3, scaling_factor=0.3611, shift_factor=0.1159)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
              max_position_embeddings=77, vocab_size=49408, projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
              vocab_size=32128, relative_attention_num_buckets=32, relative_attention_max_distance=128)
# PickScore_v1 = CLIP ViT-H/14 (laion2B)
CLIP_H = dict(
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                     max_position_embeddings=77, vocab_size=49408, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                       image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=1024)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    clip_sample=False)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


# ----------------------------------------------------------------------------- presets and budgets


@dataclasses.dataclass
class Case:
    """One line of the table: a preset on a host, its family and its budget."""
    preset: str
    family: str
    host: str                    # "CLI" or "ComfyUI"
    budget_gb: float
    builder: str                 # key of BUILDERS


CASES = [
    Case("consumer-gpu", "SD1.5", "CLI", 8.0, "sd15"),
    Case("consumer-gpu-sdxl", "SDXL", "CLI", 12.0, "sdxl"),
    Case("consumer-gpu-sdxl", "SDXL", "ComfyUI", 12.0, "sdxl-comfy"),
    Case("consumer-gpu-sd35", "SD3.5", "CLI", 16.0, "sd35"),
    Case("consumer-gpu-flux", "Flux", "CLI", 24.0, "flux"),
    Case("consumer-gpu-flux", "Flux", "ComfyUI", 16.0, "flux-comfy"),
]


# ----------------------------------------------------------------------------- model building


class TokenizerStub:
    """Token ids of the right length (all zeros): memory depends on the length only."""

    def __init__(self, model_max_length: int = 77):
        self.model_max_length = model_max_length

    def __call__(self, prompts, max_length=None, **_):
        ids = torch.zeros(len(prompts), max_length or self.model_max_length, dtype=torch.long)
        return ids if max_length is None and not _ else _Tokens(ids)


class _Tokens:
    def __init__(self, input_ids: torch.Tensor):
        self.input_ids = input_ids


def cuda_weight_dtype(config: prdp_config.TrainConfig) -> torch.dtype:
    """The frozen weights' dtype the engine picks on CUDA for this preset."""
    return diffusers_backend.frozen_weight_dtype(torch.device("cuda"), config.mixed_precision)


def fake_model(fake_mode, make: Callable[[], torch.nn.Module], dtype: torch.dtype) -> torch.nn.Module:
    """A model built on the fake GPU in `dtype` (the planned loading: the training dtype, cast
    before moving), frozen and in eval mode like the backends leave it."""
    with fake_mode, torch.device(GPU):
        module = make().to(dtype)
    return module.requires_grad_(False).eval()


def in_fake_mode(fake_mode, make: Callable):
    with fake_mode, torch.device(GPU):
        return make()


def apply_cuda_dtypes(backend, denoiser, encoders, config) -> None:
    """What the backend does on CUDA (it saw the meta device): half frozen weights, T5 per
    `_encoder_dtype`, VAE float32, LoRA float32."""
    backend.dtype = cuda_weight_dtype(config)
    lora = {id(p) for p in backend.trainable_parameters()}
    cast_frozen(denoiser, backend.dtype, lora)
    for encoder in encoders:
        dtype = backend._encoder_dtype(encoder) if hasattr(backend, "_encoder_dtype") else backend.dtype
        encoder.to(dtype)
    backend.vae.to(torch.float32)


def relocate(module: torch.nn.Module, device: torch.device, keep: set = frozenset()) -> None:
    """Move every parameter and buffer except those in `keep` (ids: the LoRA, which the
    optimizer holds) to `device`: an offload, or a load back."""
    for sub in module.modules():
        for key, param in sub._parameters.items():
            if param is not None and id(param) not in keep and param.device != device:
                sub._parameters[key] = torch.nn.Parameter(param.data.to(device), requires_grad=param.requires_grad)
        for key, buffer in sub._buffers.items():
            if buffer is not None and buffer.device != device:
                sub._buffers[key] = buffer.to(device)


@contextlib.contextmanager
def engine_moves_relocate():
    """The CLI backends' own module moves (diffusers_backend.move_module: its text-encoder placement,
    one encoder on the device at a time) done by `relocate`, which fake tensors on the meta
    stand-in support; dtypes were set by apply_cuda_dtypes already."""
    from comfyui_prdp.backends import diffusers_backend

    original = diffusers_backend.move_module
    diffusers_backend.move_module = lambda module, device, dtype: relocate(module, torch.device(device))
    try:
        yield
    finally:
        diffusers_backend.move_module = original


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype, keep: set) -> None:
    """Cast every parameter except those in `keep` (ids) to dtype."""
    for sub in module.modules():
        for key, param in sub._parameters.items():
            if param is not None and id(param) not in keep and param.dtype != dtype:
                sub._parameters[key] = torch.nn.Parameter(param.data.to(dtype), requires_grad=param.requires_grad)


def build_sd(fake_mode, config, *, xl: bool):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from comfyui_prdp.backends.diffusers_sdxl import DiffusersSDXLBackend

    f32 = torch.float32
    unet = fake_model(fake_mode, lambda: UNet2DConditionModel.from_config(SDXL_UNET if xl else SD15_UNET), f32)
    vae = fake_model(fake_mode, lambda: AutoencoderKL.from_config(VAE_SDXL if xl else VAE_SD), f32)
    clip_l = fake_model(fake_mode, lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)), f32)
    scheduler = DDPMScheduler.from_config(SD_SCHEDULER)
    if not xl:
        backend = in_fake_mode(fake_mode, lambda: diffusers_backend.DiffusersBackend(
            unet, clip_l, TokenizerStub(), vae, scheduler, config, device=GPU, model_name="sd15"))
        encoders = [clip_l]
    else:
        clip_g = fake_model(fake_mode, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)), f32)
        backend = in_fake_mode(fake_mode, lambda: DiffusersSDXLBackend(
            unet, clip_l, clip_g, TokenizerStub(), TokenizerStub(), vae, scheduler, config, device=GPU,
            model_name="sdxl"))
        encoders = [clip_l, clip_g]
    apply_cuda_dtypes(backend, unet, encoders, config)
    return backend, encoders


def build_sd35(fake_mode, config):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    from comfyui_prdp.backends.diffusers_flow import DiffusersSD3Backend

    f32 = torch.float32
    transformer = fake_model(fake_mode, lambda: SD3Transformer2DModel.from_config(SD35_MEDIUM), f32)
    vae = fake_model(fake_mode, lambda: AutoencoderKL.from_config(VAE_SD3), f32)
    clip_l = fake_model(fake_mode, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)), f32)
    clip_g = fake_model(fake_mode, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)), f32)
    t5 = fake_model(fake_mode, lambda: T5EncoderModel(T5Config(**T5_XXL)), f32)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER)
    backend = in_fake_mode(fake_mode, lambda: DiffusersSD3Backend(
        transformer, vae, scheduler, clip_l, clip_g, TokenizerStub(), TokenizerStub(), config,
        text_encoder_3=t5, tokenizer_3=TokenizerStub(512), device=GPU, model_name="sd35-medium"))
    encoders = [clip_l, clip_g, t5]
    apply_cuda_dtypes(backend, transformer, encoders, config)
    return backend, encoders


def build_flux(fake_mode, config):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    from comfyui_prdp.backends.diffusers_flow import DiffusersFluxBackend

    f32 = torch.float32
    transformer = fake_model(fake_mode, lambda: FluxTransformer2DModel.from_config(FLUX_DEV), torch.bfloat16)
    vae = fake_model(fake_mode, lambda: AutoencoderKL.from_config(VAE_FLUX), f32)
    clip_l = fake_model(fake_mode, lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)), torch.bfloat16)
    t5 = fake_model(fake_mode, lambda: T5EncoderModel(T5Config(**T5_XXL)), torch.bfloat16)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER)
    backend = in_fake_mode(fake_mode, lambda: DiffusersFluxBackend(
        transformer, vae, scheduler, clip_l, t5, TokenizerStub(), TokenizerStub(512), config, device=GPU,
        model_name="flux1-dev"))
    encoders = [clip_l, t5]
    apply_cuda_dtypes(backend, transformer, encoders, config)
    return backend, encoders


# ----------------------------------------------------------------------------- per-forward weight casts


def _frozen_layers(denoiser: torch.nn.Module, lora: set, kinds=(torch.nn.Linear, torch.nn.Conv2d)):
    """Linear / conv layers of the denoiser that are not LoRA factors."""
    return [m for m in denoiser.modules() if isinstance(m, kinds) and id(m.weight) not in lora]


def store_cast_per_forward(denoiser, storage: torch.dtype, compute: torch.dtype, lora: set,
                           kinds=(torch.nn.Linear,)) -> None:
    """Frozen weights stored in `storage`, cast to `compute` for each forward (diffusers
    layerwise casting; ComfyUI's cast of fp8 / fp16 weights). The cast copy is what autograd
    keeps for the backward pass."""
    for layer in _frozen_layers(denoiser, lora, kinds):
        layer.weight = torch.nn.Parameter(layer.weight.data.to(storage), requires_grad=False)
        layer.forward = _casting_forward(layer, compute)


def _casting_forward(layer, compute):
    def forward(x):
        weight = layer.weight.to(compute)
        bias = None if layer.bias is None else layer.bias.to(compute)
        if isinstance(layer, torch.nn.Linear):
            return F.linear(x.to(compute), weight, bias)
        return layer._conv_forward(x.to(compute), weight, bias)
    return forward


def comfy_weight_wrappers(backend, denoiser, storage: torch.dtype, compute: torch.dtype,
                          linear_storage: Optional[torch.dtype] = None) -> None:
    """ComfyUI's path (backends/comfyui), mimicked on the diffusers model: every weight and
    bias is copied per forward (ComfyUI casts with copy=True when a layer has weight wrappers,
    then the identity wrapper clones); a LoRA target's weight is merged with its factors in
    float32 (comfy.weight_adapter's LoRA diff) and cast back: W + scale * up @ down."""
    from peft.tuners.lora import LoraLayer

    lora = {id(p) for p in backend.trainable_parameters()}
    for layer in _frozen_layers(denoiser, lora):
        dtype = linear_storage if linear_storage is not None and isinstance(layer, torch.nn.Linear) else storage
        layer.weight = torch.nn.Parameter(layer.weight.data.to(dtype), requires_grad=False)
        layer.forward = _wrapped_forward(layer, compute)
    for module in denoiser.modules():
        if isinstance(module, LoraLayer) and "prdp" in module.lora_A:
            module.forward = _merged_forward(module, compute)


def _wrapped_forward(layer, compute):
    def forward(x):
        weight = layer.weight.to(compute, copy=True).clone()
        bias = None if layer.bias is None else layer.bias.to(compute, copy=True).clone()
        if isinstance(layer, torch.nn.Linear):
            return F.linear(x.to(compute), weight, bias)
        return layer._conv_forward(x.to(compute), weight, bias)
    return forward


def _merged_forward(module, compute):
    base = module.base_layer

    def forward(x, *args, **kwargs):
        weight = base.weight.to(compute, copy=True)
        if not module.disable_adapters and "prdp" in module.active_adapters:
            down, up = module.lora_A["prdp"].weight, module.lora_B["prdp"].weight
            weight = (weight.float() + module.scaling["prdp"] * (up @ down)).to(compute)
        else:
            weight = weight.clone()
        bias = None if base.bias is None else base.bias.to(compute, copy=True).clone()
        return F.linear(x.to(compute), weight, bias)
    return forward


class ComfyMimic:
    """What the ComfyUI backend changes around the same model calls: the denoiser unloaded
    while the text encoders / VAE run (ComfyUI's model management), the VAE in bf16 decoding
    one image at a time (ComfyUI sizes the VAE batch to the free memory), flow models keeping
    copies of saved tensors (comfyui.patches.saved_tensor_copies)."""

    def __init__(self, backend, denoiser, flow: bool):
        self.backend, self.denoiser, self.flow = backend, denoiser, flow
        backend.vae.to(torch.bfloat16)
        backend.decode_batch_size = 1
        original_decode = backend.decode

        def decode(latents):
            self.unload(self.denoiser)
            return original_decode(latents.to(torch.bfloat16))
        backend.decode = decode
        self._decode_dtype_patch()

    def _decode_dtype_patch(self):
        vae = self.backend.vae
        original = vae.decode

        def decode(z, *args, **kwargs):
            return original(z.to(torch.bfloat16), *args, **kwargs)
        vae.decode = decode

    def unload(self, module):
        relocate(module, torch.device("cpu"), self._lora())

    def load(self, module):
        relocate(module, GPU, self._lora())

    def _lora(self) -> set:
        return {id(p) for p in self.backend.trainable_parameters()}

    def grad_context(self):
        from comfyui_prdp.backends.comfyui.patches import saved_tensor_copies
        return saved_tensor_copies() if self.flow else contextlib.nullcontext()


# ----------------------------------------------------------------------------- the reward


def pickscore_reward(fake_mode, batch_size: int):
    """The project's PickScoreReward (its score / prepare / offload path) on a fake CLIP
    ViT-H/14 in fp16, loaded on the CPU until `prepare`."""
    from transformers import CLIPConfig, CLIPModel
    from comfyui_prdp.rewards.clip_backbones import TransformersClip
    from comfyui_prdp.rewards.model_reward import ModelReward
    from comfyui_prdp.rewards.pickscore import PickScoreReward

    with fake_mode, torch.device("cpu"):
        model = CLIPModel(CLIPConfig(**CLIP_H)).to(torch.float16).requires_grad_(False).eval()
    reward = PickScoreReward.__new__(PickScoreReward)
    ModelReward.__init__(reward, device="cpu", dtype=torch.float16, batch_size=batch_size)
    reward.device = GPU
    reward.clip = TransformersClip(model, TokenizerStub(), 224)
    return reward


# ----------------------------------------------------------------------------- one epoch


@dataclasses.dataclass
class Setup:
    backend: object
    denoiser: torch.nn.Module
    encoders: List[torch.nn.Module]
    reward: object
    comfy: Optional[ComfyMimic] = None
    design: Sequence[str] = ()


def run_epoch(meter: LiveBytes, setup: Setup, config: prdp_config.TrainConfig) -> Dict[str, int]:
    """One epoch of the trainer's phases; returns the GPU peak of each phase in bytes."""
    from comfyui_prdp.training.batches import trajectory_generators

    backend, comfy, cfg = setup.backend, setup.comfy, config
    N, B = cfg.prompts_per_epoch, cfg.images_per_prompt
    prompts = [f"prompt {i}" for i in range(N)]

    meter.phase("encode")
    if comfy is not None:                        # ComfyUI loads its CLIP (all encoders) for encoding
        comfy.unload(setup.denoiser)
        for encoder in setup.encoders:
            relocate(encoder, GPU)
        cond = repeat_cond(backend.encode_prompts(prompts), B)
        uncond = broadcast_row(backend.encode_prompts([cfg.negative_prompt]), N * B)
        for encoder in setup.encoders:
            relocate(encoder, torch.device("cpu"))
    else:                                        # the CLI backend places its encoders itself
        for encoder in setup.encoders:
            relocate(encoder, torch.device("cpu"))
        with engine_moves_relocate():
            cond = repeat_cond(backend.encode_prompts(prompts), B)
            uncond = broadcast_row(backend.encode_prompts([cfg.negative_prompt]), N * B)

    meter.phase("sampling")
    if comfy is not None:
        comfy.load(setup.denoiser)
    backend.prepare_for_sampling()
    policy = policy_for(cfg, backend)
    shape = tuple(backend.latent_shape(cfg.height, cfg.width))
    noise = trajectory_generators(cfg.seed, 0, range(N * B))
    chunks = []
    for start in range(0, N * B, cfg.sample_batch_size):
        rows = torch.arange(start, min(N * B, start + cfg.sample_batch_size))
        chunks.append(sample_trajectories(
            backend, index_cond(cond, rows), index_cond(uncond, rows), steps=cfg.steps, cfg=cfg.cfg,
            policy=policy, latent_shape=shape, generator=noise[rows[0]:rows[-1] + 1],
            reduce=cfg.logprob_reduce, with_reference=True))
    traj = join_trajectories(chunks)
    del chunks

    meter.phase("decode")                          # Trainer.score
    with torch.no_grad():
        images = torch.cat([backend.decode(traj.final[s:s + cfg.sample_batch_size].to(GPU)).float().cpu()
                            for s in range(0, N * B, cfg.sample_batch_size)])

    meter.phase("reward")
    if comfy is not None:
        comfy.unload(setup.denoiser)               # ComfyUI memory freed before the reward (planned)
    setup.reward.prepare()
    with torch.no_grad():
        setup.reward.score(images, [p for p in prompts for _ in range(B)])
    setup.reward.offload()
    del images

    meter.phase("update")
    if comfy is not None:
        comfy.load(setup.denoiser)
    update(backend, traj, cond, uncond, cfg, comfy)
    meter.phase(None)
    return {phase: meter.gpu(meter.phase_peaks[phase]) for phase in PHASES}


def update(backend, traj, cond, uncond, cfg, comfy) -> None:
    """The first update of the epoch: on-policy, so only pass 2 (Trainer.minibatch_gradient):
    micro-batches of train_batch_size transitions, backward of sum(w * logp), then AdamW."""
    params = backend.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    backend.prepare_for_training()
    n_rows, n_steps = traj.logp.shape
    rows = torch.arange(n_rows).repeat_interleave(n_steps)
    steps = torch.arange(n_steps).repeat(n_rows)
    weights = torch.full((len(rows),), 1e-3, dtype=torch.float64)
    optimizer.zero_grad(set_to_none=True)
    grad_context = comfy.grad_context() if comfy is not None else contextlib.nullcontext()
    for start in range(0, len(rows), cfg.train_batch_size):
        r, s = rows[start:start + cfg.train_batch_size], steps[start:start + cfg.train_batch_size]
        with torch.enable_grad(), grad_context:
            logp = recorded_logprob(backend, traj, r, s, index_cond(cond, r), index_cond(uncond, r), cfg=cfg.cfg,
                                    eta=cfg.eta, reduce=cfg.logprob_reduce)
            (weights[start:start + len(r)].to(logp.device) * logp).sum().backward()
        del logp
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()


# ----------------------------------------------------------------------------- the cases


def _denoiser(backend):
    return backend.unet


def setup_case(case: Case, fake_mode, config) -> Setup:
    """Build the case's models and backend the way its host would (see the module docstring)."""
    from comfyui_prdp.backends.comfyui.memory import training_compute_dtype
    from comfyui_prdp.backends.diffusers_flow import FLOW_TARGETS

    family = case.builder.split("-")[0]
    comfy = case.builder.endswith("-comfy")
    design = ["text encoders on the GPU only while encoding (CLI: one at a time)",
              "weights loaded in the training dtype (no float32 copy)"]
    if comfy and family == "flux":        # ComfyUI's Flux targets: both streams' attention + single blocks
        config = config.replace(lora_targets=FLOW_TARGETS + ["proj_mlp", "proj_out"])
    builders = {"sd15": lambda: build_sd(fake_mode, config, xl=False),
                "sdxl": lambda: build_sd(fake_mode, config, xl=True),
                "sd35": lambda: build_sd35(fake_mode, config), "flux": lambda: build_flux(fake_mode, config)}
    backend, encoders = builders[family]()
    backend.checked_finite = lambda cond: cond     # a data check (bool of a fake tensor); no memory
    denoiser = _denoiser(backend)
    lora = {id(p) for p in backend.trainable_parameters()}
    mimic = None
    if comfy:
        compute = training_compute_dtype(config.mixed_precision, "cuda", True)
        if family == "flux":
            comfy_weight_wrappers(backend, denoiser, torch.bfloat16, compute, linear_storage=torch.float8_e4m3fn)
            design.append("ComfyUI: fp8 (e4m3) checkpoint, bf16 compute; weights copied per forward, LoRA merged")
        else:
            comfy_weight_wrappers(backend, denoiser, torch.float16, compute)
            design.append(f"ComfyUI: fp16 checkpoint, {str(compute)[6:]} compute; weights copied per forward, "
                          "LoRA merged")
        backend.dtype = compute
        mimic = ComfyMimic(backend, denoiser, flow=family == "flux")
        design.append("ComfyUI: denoiser unloaded while text encoders / VAE / reward run; VAE bf16, 1 image")
    elif family == "flux":
        store_cast_per_forward(denoiser, torch.float8_e4m3fn, torch.bfloat16, lora)
        design.append("Flux base stored fp8 (e4m3), cast to bf16 per layer and forward")
    if not comfy:
        design.append(f"VAE float32, decode batch {backend.decode_batch_size} (engine)")
    design.append(f"gradient checkpointing {'on' if config.gradient_checkpointing else 'off'} (preset)")
    reward = pickscore_reward(fake_mode, 16)
    return Setup(backend, denoiser, encoders, reward, mimic, design)


@dataclasses.dataclass
class Row:
    case: Case
    phases: Dict[str, float]      # GB
    overall: float
    design: Sequence[str]
    seconds: float

    @property
    def over(self) -> bool:
        return self.overall + CUDA_CONTEXT_GB > self.case.budget_gb


def measure(case: Case, config: prdp_config.TrainConfig) -> Row:
    start = time.perf_counter()
    meter = LiveBytes()
    with fake_gpu(meter) as fake_mode:
        setup = setup_case(case, fake_mode, config)
        peaks = run_epoch(meter, setup, config)
    phases = {k: v / GB for k, v in peaks.items()}
    return Row(case, phases, max(phases.values()), setup.design, time.perf_counter() - start)


def format_table(rows: List[Row]) -> str:
    head = (f"{'preset':<18} {'host':<8} {'family':<6} " + " ".join(f"{p:>8}" for p in PHASES)
            + f" {'peak':>7} {'+ctx':>7} {'budget':>7}  verdict")
    lines = [head, "-" * len(head)]
    for row in rows:
        cells = " ".join(f"{row.phases[p]:8.2f}" for p in PHASES)
        total = row.overall + CUDA_CONTEXT_GB
        lines.append(f"{row.case.preset:<18} {row.case.host:<8} {row.case.family:<6} {cells} {row.overall:7.2f} "
                     f"{total:7.2f} {row.case.budget_gb:7.2f}  {'OVER' if row.over else 'ok'}")
    return "\n".join(lines)


def parse_table(text: str) -> List[dict]:
    """The rows of a printed table: preset, host, family, phase GBs, peak, total, budget, verdict."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 + len(PHASES) + 4 and parts[-1] in ("ok", "OVER"):
            numbers = [float(v) for v in parts[3:-1]]
            rows.append(dict(preset=parts[0], host=parts[1], family=parts[2],
                             phases=dict(zip(PHASES, numbers[:len(PHASES)])), peak=numbers[-3],
                             total=numbers[-2], budget=numbers[-1], over=parts[-1] == "OVER"))
    return rows


def exit_code(rows: List[dict]) -> int:
    return 1 if any(row["over"] or row["total"] > row["budget"] for row in rows) else 0


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None,
                        help="cases to run: preset or preset/host (e.g. consumer-gpu-flux/ComfyUI)")
    parser.add_argument("--budget", action="append", default=[], metavar="PRESET=GB",
                        help="override a budget (tests; never to pass a failing preset)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's sampling steps T")
    parser.add_argument("--flat-steps", type=int, default=None, metavar="T2",
                        help="also run the first case at T2 steps and check that its update peak is unchanged")
    return parser.parse_args(argv)


def selected_cases(args) -> List[Case]:
    budgets = {}
    for item in args.budget:
        name, _, value = item.partition("=")
        try:
            budgets[name] = float(value)
        except ValueError:
            raise SystemExit(f"--budget {item!r}: write PRESET=GB, e.g. consumer-gpu=8")
    cases = [c for c in CASES if args.only is None or c.preset in args.only or f"{c.preset}/{c.host}" in args.only]
    if not cases:
        raise SystemExit(f"--only {args.only}: no such case; presets: {', '.join(sorted({c.preset for c in CASES}))}")
    return [dataclasses.replace(c, budget_gb=budgets.get(c.preset, c.budget_gb)) for c in cases]


def preset_config(case: Case, steps: Optional[int]) -> prdp_config.TrainConfig:
    return prdp_config.preset(case.preset, **({} if steps is None else {"steps": steps}))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    rows, failed = [], []
    for case in selected_cases(args):
        try:
            rows.append(measure(case, preset_config(case, args.steps)))
        except Exception as error:      # noqa: BLE001 - one case's failure is reported, the others still run
            failed.append(case)
            print(f"# {case.preset} / {case.host}: FAILED to simulate: {type(error).__name__}: {error}", flush=True)
            continue
        print(f"# {case.preset} / {case.host}: {rows[-1].seconds:.0f} s; modelled: " + "; ".join(rows[-1].design),
              flush=True)
        print("# " + format_table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"# GB = 2^30 bytes; +ctx adds a CUDA context of {CUDA_CONTEXT_GB} GB; phases are peaks of live tensors")
    table = format_table(rows)
    print(table)
    status = max(exit_code(parse_table(table)), 1 if failed else 0)
    if args.flat_steps is not None:
        status = max(status, check_flat(rows[0], args.flat_steps))
    print(f"# wall time {time.perf_counter() - start:.0f} s; {'OVER BUDGET' if status else 'all within budget'}")
    return status


def check_flat(row: Row, steps: int) -> int:
    """The update peak at another T must equal the one measured (trajectories live on the CPU)."""
    other = measure(row.case, preset_config(row.case, steps))
    same = other.phases["update"] == row.phases["update"]
    print(f"# flat in T: {row.case.preset}/{row.case.host} update peak {row.phases['update']:.4f} GB at the preset's "
          f"T, {other.phases['update']:.4f} GB at T={steps}: {'equal' if same else 'DIFFERENT'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
