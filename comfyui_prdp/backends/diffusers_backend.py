"""A `Backend` over Stable-Diffusion-style diffusers components with a peft LoRA on the UNet.

The base model is the same UNet with the PRDP adapter switched off, so no second copy is
held. Adapters the user had already loaded (unfused peft LoRAs) stay active in both the policy
and the base model: the base model is everything the user loaded. The PRDP LoRA starts with
lora_B = 0 (no effect) and is the only trainable tensor; every other weight is frozen and the
model stays in eval mode (no dropout), so sampling and re-evaluation of the same transition
agree exactly.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch

from ..lora import keys as lora_keys
from ..models import families as model_families
from ..config import TrainConfig
from .base import Backend, Cond, block_modules

ADAPTER_NAME = "prdp"
_HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: pixels the VAE decodes per call: the float32 decoder's activations grow with them (a 1024 x
#: 1024 SDXL image at a time; four 512 x 512 SD1.5 images)
DECODE_PIXELS = 1024 * 1024


def check_scheduler(scheduler) -> None:
    """Refuse schedules the sampler would not reproduce: it never clips or thresholds x0."""
    config = scheduler.config
    for option in ("clip_sample", "thresholding"):
        if config.get(option, False):
            raise ValueError(
                f"the scheduler ({type(scheduler).__name__}) has {option}=True, which the PRDP sampler does not "
                f"apply (it never clips x0; latent models such as Stable Diffusion do not use it): set "
                f'"{option}": false in scheduler/scheduler_config.json, or pass a scheduler without it')


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """`device`, or cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def frozen_weight_dtype(device: torch.device, mixed_precision: str) -> torch.dtype:
    """Half precision for frozen weights only on CUDA with mixed precision; float32 otherwise."""
    if device.type == "cuda" and mixed_precision in _HALF_DTYPES:
        return _HALF_DTYPES[mixed_precision]
    return torch.float32


def decode_batch_size(config: TrainConfig) -> int:
    """Images per VAE decode call: as many as DECODE_PIXELS allows, at most the sampling batch, at least one."""
    per_image = max(1, int(config.height) * int(config.width))
    return max(1, min(int(config.sample_batch_size), DECODE_PIXELS // per_image))


class DiffusersBackend(Backend):
    """UNet2DConditionModel + CLIP text encoder + AutoencoderKL + a scheduler's schedule."""

    def __init__(self, unet, text_encoder, tokenizer, vae, scheduler, config: TrainConfig,
                 device: Union[str, torch.device, None] = None, model_name: str = "unknown",
                 offload_text_encoders: bool = True):
        self.device = resolve_device(device)
        self.offload_text_encoders = bool(offload_text_encoders)
        self.mixed_precision = config.mixed_precision
        self.dtype = frozen_weight_dtype(self.device, config.mixed_precision)
        self.model_name = model_name
        self.unet, self.text_encoder, self.tokenizer, self.vae = unet, text_encoder, tokenizer, vae
        self.decode_batch_size = decode_batch_size(config)

        check_scheduler(scheduler)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type={self.prediction_type!r} is not supported; "
                             f"use a model trained with one of {', '.join(_PREDICTION_TYPES)}")
        self._alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod).detach().to("cpu", torch.float64)
        self._alphas_on_device = self._alphas_cumprod.to(self.device, torch.float32)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)
        if int(unet.config.in_channels) != self.latent_channels:
            raise ValueError(f"UNet takes {unet.config.in_channels} channels but the VAE makes "
                             f"{self.latent_channels}: these components do not belong together")

        for module in (unet, vae, *self.text_encoder_modules()):
            module.requires_grad_(False)
            module.eval()
        self._add_lora(config)
        lora_in_float32(self.trainable_parameters())
        move_module(unet, self.device, self.dtype, keep=self.trainable_parameters())   # LoRA weights stay float32
        move_module(vae, self.device, torch.float32)   # the VAE is small; float32 avoids fp16 overflow
        self._place_text_encoders(self.text_encoder_home)
        self.set_gradient_checkpointing(config.gradient_checkpointing)
        self._adapters_off = False

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_components(cls, unet, text_encoder, tokenizer, vae, scheduler, config: TrainConfig,
                        device=None, model_name: str = "unknown") -> "DiffusersBackend":
        return cls(unet, text_encoder, tokenizer, vae, scheduler, config, device=device, model_name=model_name)

    @classmethod
    def from_pipeline(cls, pipe, config: TrainConfig, device=None, model_name: str = "unknown") -> "DiffusersBackend":
        """From a `StableDiffusionPipeline` (or anything with the same five components)."""
        missing = [name for name in ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
                   if getattr(pipe, name, None) is None]
        if missing:
            raise ValueError(f"pipeline {type(pipe).__name__} lacks {', '.join(missing)}: "
                             "a Stable-Diffusion-style pipeline is needed")
        return cls(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, pipe.scheduler, config,
                   device=device, model_name=model_name)

    def _add_lora(self, config: TrainConfig) -> None:
        from peft import LoraConfig

        self.lora_rank = int(config.lora_rank)
        self.lora_alpha = float(config.effective_lora_alpha)
        self.lora_targets = list(config.lora_targets)
        lora_config = LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha,
                                 target_modules=self.lora_targets, init_lora_weights=True, lora_dropout=0.0)
        self.user_adapters = _active_user_adapters(self.unet)
        try:
            self.unet.add_adapter(lora_config, adapter_name=ADAPTER_NAME)
        except ValueError as error:
            raise ValueError(f"LoRA targets {self.lora_targets} do not name layers of this UNet "
                             f"({error}); use module names such as to_q, to_k, to_v, to_out.0") from error
        self.unet.eval()  # peft creates the new LoRA modules in training mode
        self._lora_layers = self._find_lora_layers()
        if not self._lora_layers:
            raise ValueError(f"LoRA targets {self.lora_targets} matched no layer of this UNet")
        self._activate(self.user_adapters + [ADAPTER_NAME])   # add_adapter made only ours active

    def _find_lora_layers(self) -> Dict[str, torch.nn.Module]:
        from peft.tuners.lora import LoraLayer

        return {name: module for name, module in self.unet.named_modules()
                if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A}

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute UNet activations in the backward pass (less memory, ~30% more time)."""
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()
        self.gradient_checkpointing = bool(enabled)

    # --- text encoders: on the device only while they encode ------------------------------
    def text_encoder_modules(self) -> List[torch.nn.Module]:
        """The text encoders this backend holds (None entries left out)."""
        return [self.text_encoder]

    def _encoder_dtype(self, encoder) -> torch.dtype:
        """The dtype a text encoder computes in (the frozen-weight dtype)."""
        return self.dtype

    @property
    def text_encoder_home(self) -> torch.device:
        """Where the text encoders wait between encode calls: the CPU when offloaded, else the device."""
        return torch.device("cpu") if self.offload_text_encoders else self.device

    def _place_text_encoders(self, device: torch.device) -> None:
        for encoder in self.text_encoder_modules():
            move_module(encoder, device, self._encoder_dtype(encoder))

    @contextlib.contextmanager
    def text_encoders_on_device(self) -> Iterator[None]:
        """For one block, each text encoder is brought to the compute device when it is called and
        sent home when the next one is called (and at the end): one encoder on the GPU at a time,
        one round trip each per encode call, so a prompt file encoded lazily never leaves them on
        the GPU and SD3.5's T5-XXL (~9 GB) never sits there beside CLIP-G and CLIP-L."""
        if not self.offload_text_encoders:
            yield
            return
        resident: List[torch.nn.Module] = []

        def bring(encoder, _args):
            if resident and resident[0] is encoder:
                return
            while resident:
                gone = resident.pop()
                move_module(gone, self.text_encoder_home, self._encoder_dtype(gone))
            resident.append(encoder)         # before the move: one that fails half-way is sent home too
            move_module(encoder, self.device, self._encoder_dtype(encoder))

        hooks = [encoder.register_forward_pre_hook(bring, prepend=True) for encoder in self.text_encoder_modules()]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for gone in resident:
                move_module(gone, self.text_encoder_home, self._encoder_dtype(gone))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def encode_prompts(self, prompts: List[str]) -> Cond:
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not a single string")
        with self.text_encoders_on_device():
            return self._encode(list(prompts))

    # --- schedule -----------------------------------------------------------------------
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def latent_shape(self, height: int, width: int) -> Sequence[int]:
        factor = self.vae_scale_factor
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(f"image size {width}x{height} must be a positive multiple of {factor} "
                             f"for this model (e.g. {max(factor, width // factor * factor)}x"
                             f"{max(factor, height // factor * factor)})")
        return (self.latent_channels, height // factor, width // factor)

    # --- model verbs --------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda" and self.mixed_precision in _HALF_DTYPES:
            return torch.autocast("cuda", dtype=_HALF_DTYPES[self.mixed_precision])
        return contextlib.nullcontext()

    def _encode(self, prompts: List[str]) -> Cond:
        """The conditioning of `prompts`, the text encoders being on the device."""
        max_length = min(int(self.tokenizer.model_max_length),
                         int(self.text_encoder.config.max_position_embeddings))
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=max_length,
                                truncation=True, return_tensors="pt")
        with self._autocast():
            hidden = self.text_encoder(tokens.input_ids.to(self.device))[0]
        return {"context": hidden.to(self.dtype)}

    def predict_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        x = x.to(self.device)
        with self._autocast():
            out = self._unet_output(x.to(self.dtype), t, cond)
        if self.prediction_type == "epsilon":
            return out
        alpha = self._alphas_on_device[t.long()].view(-1, *([1] * (x.dim() - 1)))
        out, x = out.float(), x.float()
        if self.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0
            return alpha.sqrt() * out + (1 - alpha).sqrt() * x
        return (x - alpha.sqrt() * out) / (1 - alpha).sqrt()  # "sample": the model predicts x0

    def _unet_output(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The UNet's raw prediction (eps, v or x0) for model-dtype latents on the device."""
        return self.unet(x, t, encoder_hidden_states=cond["context"].to(self.device)).sample

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        scaling = float(self.vae.config.scaling_factor)
        shift = self.vae.config.get("shift_factor", None) or 0.0
        images = []
        for chunk in latents.split(self.decode_batch_size):
            z = chunk.to(self.device, torch.float32) / scaling + shift
            pixels = self.vae.decode(z).sample
            images.append(((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu())
        return torch.cat(images).contiguous()

    def stop_check_modules(self) -> List[torch.nn.Module]:
        return block_modules(self.unet)     # the UNet, or the flow backends' transformer

    # --- the LoRA -----------------------------------------------------------------------
    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        parameters = []
        for layer in self._lora_layers.values():
            parameters.extend(layer.lora_A[ADAPTER_NAME].parameters())
            parameters.extend(layer.lora_B[ADAPTER_NAME].parameters())
        return parameters

    def _activate(self, names: List[str]) -> None:
        """Make exactly `names` the active adapters; only the PRDP LoRA ever requires grad."""
        self.unet.set_adapter(names)
        trainable = {id(p) for p in self.trainable_parameters()}
        for name, parameter in self.unet.named_parameters():
            if "lora_" in name:
                parameter.requires_grad_(id(parameter) in trainable)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The base model: the user's adapters (if any) without the PRDP LoRA."""
        if self._adapters_off:  # nested: already the base model
            yield
            return
        if self.user_adapters:
            self._activate(self.user_adapters)
        else:
            self.unet.disable_adapters()
        self._adapters_off = True
        try:
            yield
        finally:
            if self.user_adapters:
                self._activate(self.user_adapters + [ADAPTER_NAME])
            else:
                self.unet.enable_adapters()
            self._adapters_off = False
            for parameter in self.trainable_parameters():
                parameter.requires_grad_(True)

    def lora_state_dict(self) -> Dict[str, torch.Tensor]:
        state: Dict[str, torch.Tensor] = {}
        for module_name, layer in self._lora_layers.items():
            down = layer.lora_A[ADAPTER_NAME].weight
            up = layer.lora_B[ADAPTER_NAME].weight
            state[lora_keys.kohya_key(module_name, lora_keys.DOWN)] = export_tensor(down)
            state[lora_keys.kohya_key(module_name, lora_keys.UP)] = export_tensor(up)
            state[lora_keys.kohya_key(module_name, lora_keys.ALPHA)] = torch.tensor(
                float(layer.lora_alpha[ADAPTER_NAME]), dtype=torch.float32)
        return state

    @torch.no_grad()
    def load_lora_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Load a kohya LoRA made for this model and LoRA layout (same modules and rank).

        An `.alpha` different from this backend's is folded into lora_up, so the loaded
        LoRA has exactly the effect it had where it was saved.
        """
        grouped = lora_keys.require_every_module(lora_keys.group_by_module(state, self._lora_layers), self._lora_layers)
        for module_name, parts in grouped.items():
            layer = self._lora_layers[module_name]
            down_param = layer.lora_A[ADAPTER_NAME].weight
            up_param = layer.lora_B[ADAPTER_NAME].weight
            down, up = parts[lora_keys.DOWN], parts[lora_keys.UP]
            if tuple(down.shape) != tuple(down_param.shape) or tuple(up.shape) != tuple(up_param.shape):
                raise ValueError(f"LoRA shapes for {module_name} are down {tuple(down.shape)}, up {tuple(up.shape)}; "
                                 f"this model needs {tuple(down_param.shape)}, {tuple(up_param.shape)} "
                                 f"(rank {self.lora_rank}): set lora_rank to the file's rank")
            rank = down.shape[0]
            file_scale = float(parts[lora_keys.ALPHA]) / rank if lora_keys.ALPHA in parts else 1.0
            own_scale = float(layer.scaling[ADAPTER_NAME])
            down_param.copy_(down.to(down_param.device, down_param.dtype))
            up_param.copy_((up.double() * (file_scale / own_scale)).to(up_param.device, up_param.dtype))

    @property
    def family(self) -> model_families.ModelFamily:
        """SD1.x or SD2.x (1024-wide text embeddings), v-prediction from the scheduler."""
        return model_families.diffusers_family(False, self.prediction_type == "v_prediction",
                                               cross_attention_dim=int(self.unet.config.cross_attention_dim))

    def lora_info(self) -> Dict[str, object]:
        return {"rank": self.lora_rank, "alpha": self.lora_alpha, "targets": list(self.lora_targets),
                "family": self.family,
                "adapted_modules": len(self._lora_layers),
                "trainable_parameters": sum(p.numel() for p in self.trainable_parameters())}


def lora_in_float32(parameters) -> None:
    """The LoRA trains in float32: peft creates its layers in the dtype of the layer they adapt,
    half precision when the model was loaded in the training dtype."""
    for parameter in parameters:
        if parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def _active_user_adapters(unet) -> List[str]:
    """Names of the peft adapters in effect on `unet` before PRDP adds its own ([] if none,
    or if the user disabled them)."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            if getattr(module, "disable_adapters", False):
                return []
            active = module.active_adapter
            names = [active] if isinstance(active, str) else list(active)
            if ADAPTER_NAME in names:
                raise ValueError(f"the UNet already has an adapter named {ADAPTER_NAME!r}: fuse or delete it "
                                 "(unet.delete_adapters) before training a new PRDP LoRA")
            return names
    return []


def move_module(module: torch.nn.Module, device: torch.device, dtype: Optional[torch.dtype],
          keep: Sequence[torch.nn.Parameter] = ()) -> None:
    """Cast `module`'s floating-point weights to `dtype` where they are, then move it to `device`:
    cast first, so a half-precision model never exists on the GPU in float32. Parameters in `keep`
    (the LoRA) keep their dtype; dtype None moves without casting."""
    cast_module(module, dtype, keep)
    module.to(device)


def cast_module(module: torch.nn.Module, dtype: Optional[torch.dtype], keep: Sequence[torch.nn.Parameter] = ()) -> None:
    """`module`'s floating-point weights in `dtype`, in place and where they are, except `keep`'s."""
    kept = {id(p): (p, p.data) for p in keep}
    if dtype is None or all(p.dtype == dtype for p in module.parameters()
                            if p.is_floating_point() and id(p) not in kept):
        return
    module.to(dtype=dtype)
    for parameter, data in kept.values():
        parameter.data = data


def export_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float32).contiguous().clone()
