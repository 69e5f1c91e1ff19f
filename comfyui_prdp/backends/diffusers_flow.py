"""Diffusers backends for rectified-flow transformers: SD3 / SD3.5 and Flux.1, with a peft LoRA.

The transformer predicts the flow velocity v = noise - x0 in the model's own terms
(`prediction = "velocity"`); the flow_sde policy turns it into its transition. What each
pipeline feeds its transformer, reproduced here:
- SD3 (`StableDiffusion3Pipeline`): CLIP-L and CLIP-G penultimate hidden states side by side,
  zero-padded to the joint attention width and followed by T5's hidden states (zeros when the
  pipeline has no T5); pooled = CLIP-L and CLIP-G projected text embeddings; timestep =
  1000 sigma; classifier-free guidance on the velocity (the sampler's cfg).
- Flux.1 (`FluxPipeline`): CLIP-L's pooled output and T5's hidden states; latents packed in
  2x2 patches with img_ids (row, column) and zero txt_ids; timestep = sigma; a
  guidance-distilled transformer (dev, `guidance_embeds`) takes the guidance value as input
  (train with cfg 1), schnell takes none.
The schedule is the pipeline's scheduler (FlowMatchEulerDiscreteScheduler) set as the pipeline
sets it: its shift, or with `use_dynamic_shifting` the resolution-dependent shift mu from the
image's token count (Flux; base/max shift and sequence lengths from the scheduler config), and
Flux's linspace(1, 1/steps) input sigmas. The size is the training size of the config.

LoRA files use the diffusers/peft naming `transformer.<module>.lora_A.weight` / `.lora_B.weight`
with alpha / rank folded into lora_B (no alpha keys): diffusers' `load_lora_weights` and
ComfyUI's LoraLoader (its `transformer.` keys for SD3 and Flux) both read that at scale 1.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..lora import keys as lora_keys
from ..models import families as model_families
from ..config import TrainConfig
from .base import Cond
from .diffusers_backend import (ADAPTER_NAME, DiffusersBackend, cast_module, decode_batch_size, export_tensor,
                                frozen_weight_dtype, lora_in_float32, move_module, resolve_device)

#: the UNet default of TrainConfig.lora_targets; on a flow transformer it becomes FLOW_TARGETS
UNET_DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
#: attention projections of the image stream and the text stream (joint / double blocks)
FLOW_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
FLUX_DEFAULT_GUIDANCE = 3.5          # FluxPipeline's guidance_scale and ComfyUI's FluxGuidance default
#: the storage dtype of an fp8 frozen base (compute stays in the frozen-weight dtype, bf16)
FP8_STORAGE = torch.float8_e4m3fn
#: GPU memory Flux training needs besides the transformer's weights: LoRA + AdamW, one
#: checkpointed micro-batch's activations, the VAE decode, a reward model (issue 20: 2-3 GB
#: for the update at 512 px, a few GB for the reward), with room for the allocator
FLUX_WORKING_MEMORY = 8 * 1024 ** 3


def flow_targets(targets: Sequence[str]) -> List[str]:
    """The LoRA targets on a flow transformer: as configured, except that the UNet default
    becomes the attention projections of both streams (FLOW_TARGETS)."""
    return list(FLOW_TARGETS) if list(targets) == UNET_DEFAULT_TARGETS else list(targets)


def check_flow_scheduler(scheduler) -> None:
    """Refuse schedulers that are not a rectified-flow Euler schedule the policy can follow."""
    config = getattr(scheduler, "config", None)
    if config is None or type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"the scheduler ({type(scheduler).__name__}) is not FlowMatchEulerDiscreteScheduler: "
                         "SD3 and Flux pipelines use that one; pass the pipeline's own scheduler")
    for option in ("invert_sigmas", "stochastic_sampling"):
        if config.get(option, False):
            raise ValueError(f"the scheduler has {option}=True, which the flow policy does not follow: set "
                             f'"{option}": false in scheduler/scheduler_config.json')


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                    max_shift: float) -> float:
    """mu of the resolution-dependent shift: linear in the image's token count, base_shift at
    base_seq_len tokens and max_shift at max_seq_len (as the Flux / SD3 pipelines compute it)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def gpu_memory_bytes(device: torch.device) -> int:
    """Total memory of a CUDA device (0 for any other device)."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.get_device_properties(device).total_memory)


def flux_needs_fp8(transformer, device: torch.device, config: TrainConfig) -> bool:
    """Whether the Flux transformer must be stored in fp8 to train on `device` (fp8_base=None):
    on CUDA, when its weights in the frozen-weight dtype and FLUX_WORKING_MEMORY do not fit
    the card (Flux.1-dev in bf16 is 23.8 GB = 22.2 GiB: a 24 GB card stores it in fp8, a 32 GB one not)."""
    if device.type != "cuda":
        return False
    size = frozen_weight_dtype(device, config.mixed_precision).itemsize
    weights = sum(p.numel() for p in transformer.parameters()) * size
    return weights + FLUX_WORKING_MEMORY > gpu_memory_bytes(device)


class DiffusersFlowBackend(DiffusersBackend):
    """Common part of the SD3 and Flux backends: transformer + VAE + flow scheduler + LoRA.

    DiffusersBackend's LoRA methods (peft adapter, base model = adapter disabled, user
    adapters kept) act on `unet`, which here is the transformer."""

    sampling_kind = "flow"
    prediction = "velocity"
    architecture = "abstract"
    #: the pipeline passes linspace(1, 1/steps, steps) as the scheduler's input sigmas (Flux)
    explicit_sigmas = False
    #: the pipeline's default max_sequence_length for T5
    max_sequence_length = 256

    def __init__(self, transformer, vae, scheduler, text_encoders: Sequence, tokenizers: Sequence,
                 config: TrainConfig, device: Union[str, torch.device, None] = None, model_name: str = "unknown",
                 offload_text_encoders: bool = True, fp8_base: bool = False):
        self.device = resolve_device(device)
        self.offload_text_encoders = bool(offload_text_encoders)
        self.mixed_precision = config.mixed_precision
        self.dtype = frozen_weight_dtype(self.device, config.mixed_precision)
        self.model_name = model_name
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.decode_batch_size = decode_batch_size(config)
        check_flow_scheduler(scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)
        self.patch_size = 2                      # SD3's patch embedding / Flux's 2x2 packing
        self.image_size = (int(config.height), int(config.width))
        self._check_layout()

        for module in (transformer, vae, *self.text_encoder_modules()):
            module.requires_grad_(False)
            module.eval()
        self._add_lora(config.replace(lora_targets=flow_targets(config.lora_targets)))
        lora_in_float32(self.trainable_parameters())
        cast_module(transformer, self.dtype, keep=self.trainable_parameters())    # LoRA weights stay float32
        #: the frozen base's storage dtype (float8 stores the Linear weights in 1 byte, see store_base_in_fp8)
        self.base_storage_dtype = self.dtype
        if fp8_base:
            self.store_base_in_fp8()
        transformer.to(self.device)
        move_module(vae, self.device, torch.float32)
        self._place_text_encoders(self.text_encoder_home)
        self.set_gradient_checkpointing(config.gradient_checkpointing)
        self._adapters_off = False

    def text_encoder_modules(self) -> List[torch.nn.Module]:
        return [encoder for encoder in self.text_encoders if encoder is not None]

    def store_base_in_fp8(self) -> None:
        """Store the frozen transformer's Linear / Conv weights in float8 (e4m3), each cast to the
        compute dtype for its own forward (diffusers' layerwise casting): half the memory of bf16.
        Norms, embeddings and the LoRA (peft layers) keep their dtype; the LoRA trains in float32."""
        if not hasattr(self.transformer, "enable_layerwise_casting"):
            raise ValueError("storing the base model in fp8 needs diffusers >= 0.33 (enable_layerwise_casting): "
                             "upgrade diffusers, or train without fp8_base")
        self.transformer.enable_layerwise_casting(storage_dtype=FP8_STORAGE, compute_dtype=self.dtype)
        self.base_storage_dtype = FP8_STORAGE
        if any(p.dtype != torch.float32 for p in self.trainable_parameters()):
            raise RuntimeError("layerwise casting reached the LoRA weights, which must stay float32: this "
                               "diffusers does not skip peft layers; upgrade diffusers or train without fp8_base")

    @property
    def unet(self):
        """The denoiser DiffusersBackend's LoRA methods adapt: the transformer."""
        return self.transformer

    def _check_layout(self) -> None:
        raise NotImplementedError

    # --- schedule -----------------------------------------------------------------------
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        raise ValueError(f"{self.architecture} is a flow-matching model with no DDPM schedule: "
                         "train it with the flow_sde policy (policy 'auto')")

    def image_seq_len(self, height: int, width: int) -> int:
        """Image tokens of the transformer at height x width pixels."""
        factor = self.vae_scale_factor * self.patch_size
        return (height // factor) * (width // factor)

    def flow_sigmas(self, steps: int, height: Optional[int] = None, width: Optional[int] = None) -> torch.Tensor:
        """float64 [steps + 1]: the sigmas the pipeline's scheduler runs at `steps` steps and the
        training size (or height x width), terminal 0 included."""
        height, width = (height or self.image_size[0]), (width or self.image_size[1])
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        config = scheduler.config
        options: Dict[str, object] = {}
        if config.get("use_dynamic_shifting", False):
            options["mu"] = calculate_shift(self.image_seq_len(height, width), config.get("base_image_seq_len", 256),
                                            config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                            config.get("max_shift", 1.15))
        if self.explicit_sigmas:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), **options)
        else:
            scheduler.set_timesteps(steps, **options)
        return torch.as_tensor(scheduler.sigmas).detach().to("cpu", torch.float64).clone()

    def latent_shape(self, height: int, width: int) -> Sequence[int]:
        factor = self.vae_scale_factor * self.patch_size
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(f"image size {width}x{height} must be a positive multiple of {factor} for "
                             f"{self.architecture} (VAE factor {self.vae_scale_factor} x patch {self.patch_size}), "
                             f"e.g. {max(factor, width // factor * factor)}x{max(factor, height // factor * factor)}")
        return (self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def _encoder_dtype(self, encoder) -> torch.dtype:
        """T5 stays float32 under fp16 (its activations overflow fp16's range; bf16 is fine)."""
        if self.dtype == torch.float16 and type(encoder).__name__.startswith("T5"):
            return torch.float32
        return self.dtype

    # --- model verbs --------------------------------------------------------------------
    def _t5_hidden(self, encoder, tokenizer, prompts: List[str]) -> torch.Tensor:
        """T5's last hidden states, at most `max_sequence_length` tokens (no autocast where T5 is float32)."""
        length = min(int(tokenizer.model_max_length), self.max_sequence_length)
        context = self._autocast() if self._encoder_dtype(encoder) == self.dtype else torch.autocast(
            self.device.type, enabled=False)
        with context:
            return encoder(self._tokens(tokenizer, prompts, length))[0]

    @staticmethod
    def checked_finite(cond: Cond) -> Cond:
        """The conditioning, or a ValueError when a text encoder gave NaN / inf."""
        bad = [key for key, value in cond.items() if not bool(torch.isfinite(value).all())]
        if bad:
            raise ValueError(f"the text encoders gave NaN / inf in {', '.join(bad)}: the encoder weights are damaged "
                             "or overflow in this precision; use --mixed-precision bf16 or no")
        return cond

    def _tokens(self, tokenizer, prompts: List[str], max_length: int) -> torch.Tensor:
        return tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def predict_eps(self, x, t, cond):
        raise ValueError("a flow transformer predicts a velocity, not a VP noise: use predict (policy flow_sde)")

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity (noise - x0) at latents x [n, C, h, w] and sigmas t [n]."""
        sigma = torch.as_tensor(t, device=self.device, dtype=torch.float32)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        with self._autocast():
            return self._velocity(x.to(self.device, self.dtype), sigma, cond)

    def _velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    # --- the LoRA -----------------------------------------------------------------------
    def lora_state_dict(self) -> Dict[str, torch.Tensor]:
        """diffusers/peft keys, alpha / rank folded into lora_B (see the module docstring)."""
        state: Dict[str, torch.Tensor] = {}
        for module_name, layer in self._lora_layers.items():
            scale = float(layer.scaling[ADAPTER_NAME])
            state[lora_keys.peft_key(module_name, lora_keys.PEFT_DOWN)] = export_tensor(layer.lora_A[ADAPTER_NAME].weight)
            up = layer.lora_B[ADAPTER_NAME].weight.detach().double() * scale
            state[lora_keys.peft_key(module_name, lora_keys.PEFT_UP)] = export_tensor(up)
        return state

    @torch.no_grad()
    def load_lora_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Inverse of `lora_state_dict` (same modules and rank); the file's lora_B holds the scale."""
        grouped = lora_keys.require_every_module(lora_keys.group_peft_by_module(state, self._lora_layers), self._lora_layers)
        for module_name, parts in grouped.items():
            layer = self._lora_layers[module_name]
            down_param, up_param = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            down, up = parts[lora_keys.PEFT_DOWN], parts[lora_keys.PEFT_UP]
            if tuple(down.shape) != tuple(down_param.shape) or tuple(up.shape) != tuple(up_param.shape):
                raise ValueError(f"LoRA shapes for {module_name} are A {tuple(down.shape)}, B {tuple(up.shape)}; "
                                 f"this model needs {tuple(down_param.shape)}, {tuple(up_param.shape)} "
                                 f"(rank {self.lora_rank}): set lora_rank to the file's rank")
            scale = float(layer.scaling[ADAPTER_NAME])
            down_param.copy_(down.to(down_param.device, down_param.dtype))
            up_param.copy_((up.double() / scale).to(up_param.device, up_param.dtype))

    def lora_info(self) -> Dict[str, object]:
        info = super().lora_info()
        info["file_alpha"] = float(self.lora_rank)       # alpha / rank is folded into lora_B
        info["key_format"] = "diffusers"
        return info


class DiffusersSD3Backend(DiffusersFlowBackend):
    """SD3 / SD3.5: SD3Transformer2DModel + CLIP-L + CLIP-G (+ optional T5) + VAE."""

    architecture = "sd3"

    def __init__(self, transformer, vae, scheduler, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                 config: TrainConfig, text_encoder_3=None, tokenizer_3=None,
                 device: Union[str, torch.device, None] = None, model_name: str = "unknown",
                 offload_text_encoders: bool = True, fp8_base: bool = False):
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("an SD3 T5 encoder needs both text_encoder_3 and tokenizer_3 (or neither: no T5)")
        super().__init__(transformer, vae, scheduler, (text_encoder, text_encoder_2, text_encoder_3),
                         (tokenizer, tokenizer_2, tokenizer_3), config, device=device, model_name=model_name,
                         offload_text_encoders=offload_text_encoders, fp8_base=fp8_base)

    @classmethod
    def from_pipeline(cls, pipe, config: TrainConfig, device=None, model_name: str = "unknown"):
        return cls(pipe.transformer, pipe.vae, pipe.scheduler, pipe.text_encoder, pipe.text_encoder_2,
                   pipe.tokenizer, pipe.tokenizer_2, config, text_encoder_3=getattr(pipe, "text_encoder_3", None),
                   tokenizer_3=getattr(pipe, "tokenizer_3", None), device=device, model_name=model_name)

    def _check_layout(self) -> None:
        config = self.transformer.config
        if type(self.transformer).__name__ != "SD3Transformer2DModel":
            raise ValueError(f"an SD3 pipeline needs an SD3Transformer2DModel, not {type(self.transformer).__name__}")
        if int(config.in_channels) != self.latent_channels:
            raise ValueError(f"the transformer takes {config.in_channels} channels but the VAE makes "
                             f"{self.latent_channels}: these components do not belong together")
        self.patch_size = int(config.patch_size)

    @property
    def family(self) -> model_families.ModelFamily:
        config = self.transformer.config
        return model_families.diffusers_flow_family(
            "sd3", sd35=bool(config.get("dual_attention_layers") or config.get("qk_norm")))

    def _encode(self, prompts: List[str]) -> Cond:
        clip_l, clip_g, t5 = self.text_encoders
        tok_l, tok_g, tok_t5 = self.tokenizers
        hidden, pooled = [], []
        with self._autocast():
            for tokenizer, encoder in ((tok_l, clip_l), (tok_g, clip_g)):
                out = encoder(self._tokens(tokenizer, prompts, int(tokenizer.model_max_length)),
                              output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled.append(out[0])                         # the projected text embedding
            width = int(self.transformer.config.joint_attention_dim)
            clip_context = torch.cat(hidden, dim=-1)
            if clip_context.shape[-1] > width:
                raise ValueError(f"CLIP-L + CLIP-G give {clip_context.shape[-1]} features, more than the "
                                 f"transformer's joint_attention_dim {width}: the components do not belong together")
            clip_context = torch.nn.functional.pad(clip_context, (0, width - clip_context.shape[-1]))
            if t5 is None:
                t5_context = clip_context.new_zeros(len(prompts), int(tok_l.model_max_length), width)
        if t5 is not None:
            t5_context = self._t5_hidden(t5, tok_t5, prompts)
        context = torch.cat([clip_context, t5_context.to(clip_context.dtype)], dim=-2)
        return self.checked_finite({"context": context.to(self.dtype),
                                    "pooled_output": torch.cat(pooled, dim=-1).to(self.dtype)})

    def _velocity(self, x, sigma, cond):
        return self.transformer(hidden_states=x, encoder_hidden_states=cond["context"].to(self.device),
                                pooled_projections=cond["pooled_output"].to(self.device),
                                timestep=sigma.float() * 1000, return_dict=False)[0]   # float32, as the pipeline


class DiffusersFluxBackend(DiffusersFlowBackend):
    """Flux.1 (dev / schnell): FluxTransformer2DModel + CLIP-L (pooled) + T5 + VAE."""

    architecture = "flux"
    explicit_sigmas = True
    max_sequence_length = 512

    def __init__(self, transformer, vae, scheduler, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                 config: TrainConfig, device: Union[str, torch.device, None] = None, model_name: str = "unknown",
                 offload_text_encoders: bool = True, fp8_base: Optional[bool] = None):
        if fp8_base is None:
            fp8_base = flux_needs_fp8(transformer, resolve_device(device), config)
        super().__init__(transformer, vae, scheduler, (text_encoder, text_encoder_2), (tokenizer, tokenizer_2),
                         config, device=device, model_name=model_name,
                         offload_text_encoders=offload_text_encoders, fp8_base=fp8_base)
        guidance = config.flow_guidance
        if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
            raise ValueError(f"flow_guidance={guidance}: must be a finite number >= 0 (Flux.1-dev: 3.5)")
        #: the guidance a guidance-distilled transformer gets as input (None: the model takes none)
        self.guidance = None
        if self.transformer.config.guidance_embeds:
            self.guidance = FLUX_DEFAULT_GUIDANCE if guidance is None else float(guidance)

    @classmethod
    def from_pipeline(cls, pipe, config: TrainConfig, device=None, model_name: str = "unknown"):
        return cls(pipe.transformer, pipe.vae, pipe.scheduler, pipe.text_encoder, pipe.text_encoder_2,
                   pipe.tokenizer, pipe.tokenizer_2, config, device=device, model_name=model_name)

    def _check_layout(self) -> None:
        config = self.transformer.config
        if type(self.transformer).__name__ != "FluxTransformer2DModel":
            raise ValueError(f"a Flux pipeline needs a FluxTransformer2DModel, not {type(self.transformer).__name__}")
        if int(config.in_channels) != 4 * self.latent_channels:
            raise ValueError(f"the transformer takes {config.in_channels} packed channels but the VAE makes "
                             f"{self.latent_channels} (x 4 when packed): these components do not belong together")

    @property
    def family(self) -> model_families.ModelFamily:
        return model_families.diffusers_flow_family("flux", guidance_distilled=bool(
            self.transformer.config.guidance_embeds))

    def _encode(self, prompts: List[str]) -> Cond:
        clip, t5 = self.text_encoders
        tok_clip, tok_t5 = self.tokenizers
        with self._autocast():
            pooled = clip(self._tokens(tok_clip, prompts, int(tok_clip.model_max_length)),
                          output_hidden_states=False).pooler_output
        context = self._t5_hidden(t5, tok_t5, prompts)
        return self.checked_finite({"context": context.to(self.dtype), "pooled_output": pooled.to(self.dtype)})

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """[n, C, h, w] -> [n, h/2 * w/2, 4C]: 2x2 patches as tokens (FluxPipeline._pack_latents)."""
        n, c, h, w = latents.shape
        return latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), 4 * c)

    @staticmethod
    def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Inverse of `pack` for latents of height h and width w."""
        n, _, packed = tokens.shape
        c = packed // 4
        return tokens.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)

    @staticmethod
    def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
        """[h/2 * w/2, 3] token positions (0, row, column) of packed latents of size h x w."""
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        return ids.reshape(-1, 3).to(device, dtype)

    def _velocity(self, x, sigma, cond):
        n, _, h, w = x.shape
        context = cond["context"].to(self.device)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((n,), self.guidance, device=self.device, dtype=torch.float32)
        out = self.transformer(hidden_states=self.pack(x), encoder_hidden_states=context,
                               pooled_projections=cond["pooled_output"].to(self.device), timestep=sigma.to(x.dtype),
                               img_ids=self.image_ids(h, w, self.device, x.dtype),
                               txt_ids=torch.zeros(context.shape[1], 3, device=self.device, dtype=x.dtype),
                               guidance=guidance, return_dict=False)[0]
        return self.unpack(out, h, w)
