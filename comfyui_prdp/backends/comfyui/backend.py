"""The Backend over ComfyUI's own MODEL / CLIP / VAE objects (see the package docstring)."""
from __future__ import annotations

import collections
import contextlib
import math
import uuid
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from ...lora import comfy_adapter as comfy_lora
from ...models import families as model_families
from ...models.inference_tensors import ordinary
from ...runs.stop_signals import StopRequested
from ..base import Backend, Cond, block_modules
from .adapters import (DEFAULT_TARGETS, AdapterSwitch, SwitchableAdapter, identity_weight, is_target_module,
                       resolve_targets)
from .conditioning import PROMPT_CACHE_SIZE, TOKEN_EXTRAS, PromptConditioning, row_groups
from .memory import REWARD_MEMORY_HEADROOM, training_clone, training_compute_dtype, training_reserve
from .patches import BlockCheckpointing, InferenceParameterCopies, comfy_training_mode, saved_tensor_copies
from .sampling_kind import flow_sigmas, refuse_unsupported_architecture, sampling_kind, vp_sigmas

__all__ = ["ComfyBackend", "ModelInterrupted", "PROMPT_CACHE_SIZE"]

class ModelInterrupted(StopRequested):
    """ComfyUI's Cancel, raised inside a model call: the trainer stops gracefully on it."""


class ComfyBackend(PromptConditioning, Backend):
    """Backend over a ComfyUI MODEL (ModelPatcher), CLIP and VAE.

    Build it with inference mode off (the node does `torch.inference_mode(False)`), so the
    LoRA factors are ordinary trainable tensors.
    """

    def __init__(self, model, clip, vae, *, rank: int = 8, alpha: Optional[float] = None,
                 targets: Sequence[str] = DEFAULT_TARGETS, seed: int = 0,
                 model_name: Optional[str] = None, gradient_checkpointing: bool = False,
                 mixed_precision: Optional[str] = None, guidance: Optional[float] = None):
        import comfy.model_management
        import comfy.weight_adapter

        if model is None or not hasattr(model, "clone") or not hasattr(model, "model"):
            raise ValueError("model: expected a ComfyUI MODEL (connect the MODEL output of Load Checkpoint)")
        refuse_unsupported_architecture(model.model)
        if clip is None:
            raise ValueError("clip is None: the checkpoint has no text encoder; load one with a CLIP loader")
        if vae is None:
            raise ValueError("vae is None: the checkpoint has no VAE; load one with Load VAE")
        if rank < 1:
            raise ValueError(f"lora_rank={rank}: must be at least 1")
        if guidance is not None and not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance >= 0):
            raise ValueError(f"guidance={guidance}: must be a finite number >= 0 (Flux.1-dev: 3.5, as FluxGuidance)")
        self.source_model = model
        self.clip = clip
        self.vae = vae
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.targets = tuple(targets)
        sampling = model.get_model_object("model_sampling")
        self.sampling_kind = sampling_kind(sampling)          # before any expensive work
        self._model_sampling = sampling
        if self.sampling_kind == "flow":
            self.prediction = "x0"                            # apply_model's denoised output
            self._sigmas = None
        else:
            self._sigmas = vp_sigmas(sampling)
        #: Flux-style guidance-distilled models take the guidance value as conditioning (cfg 1);
        #: None keeps ComfyUI's default (3.5 for Flux, as without a FluxGuidance node)
        self.guidance = None if guidance is None else float(guidance)
        self.interrupted = False
        self.patcher = training_clone(model)
        base = self.patcher.model
        self.model_name = model_name or type(base.model_config).__name__
        self.device = self.patcher.load_device
        self.dtype = torch.float32   # inputs; ComfyUI casts to the model's compute dtype itself
        compute = training_compute_dtype(
            mixed_precision, self.device.type,
            self.device.type == "cuda" and comfy.model_management.should_use_bf16(self.device))
        if compute is not None:
            self.patcher.set_model_compute_dtype(compute)
        #: what the model computes in (float16 turns on the trainer's loss scaling)
        self.compute_dtype = compute or getattr(base, "manual_cast_dtype", None) or base.get_dtype()
        self._alphas = None if self._sigmas is None else 1.0 / (1.0 + self._sigmas.double() ** 2)
        self._needs_pooled = bool(getattr(base, "adm_channels", 0))
        #: flow transformers (SD3, Flux) read the pooled text vector when the CLIP gives one
        self._pass_pooled = self._needs_pooled or self.sampling_kind == "flow"
        self._prompt_cache: "collections.OrderedDict[str, Dict[str, torch.Tensor]]" = collections.OrderedDict()
        self._model_options = None
        self.switch = AdapterSwitch()
        self.adapters: Dict[str, SwitchableAdapter] = {}
        self._wrappers: List[object] = []
        self._loaded_batch = 0
        self._training_baseline: Optional[int] = None   # CUDA bytes allocated when the update phase began
        self._training_peak = 0                          # the largest update-phase peak above it so far
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self._checkpointing: Optional[BlockCheckpointing] = None

        self.targets = resolve_targets([n for n, _ in base.diffusion_model.named_modules()], self.targets)
        with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name, module in base.diffusion_model.named_modules():
                if not hasattr(module, "weight_function"):
                    continue  # not a ComfyUI op (containers, model_sampling)
                key = f"diffusion_model.{name}"
                weight = getattr(module, "weight", None)
                if weight is not None:
                    if is_target_module(name, self.targets) and weight.dim() == 2:
                        lora = comfy.weight_adapter.LoRAAdapter.create_train(weight, self.rank, self.alpha)
                        wrapper = SwitchableAdapter(lora, self.switch)
                        wrapper.requires_grad_(True)
                        lora.alpha.requires_grad_(False)
                        self.adapters[name] = wrapper
                    else:
                        wrapper = identity_weight
                    self.patcher.add_weight_wrapper(f"{key}.weight", wrapper)
                    self._wrappers.append(wrapper)
                if getattr(module, "bias", None) is not None:
                    self.patcher.add_weight_wrapper(f"{key}.bias", identity_weight)
        self._parameter_copies = InferenceParameterCopies(base.diffusion_model)
        if not self.adapters:
            self.release()     # the identity wrappers may sit on modules shared with the user's model
            raise ValueError(f"no module of this model matches the LoRA targets {list(self.targets)}; name "
                             "modules of its diffusion model (e.g. to_q, or a glob like double_blocks.*.img_attn.qkv)")
        self._ldm_to_diffusers = comfy_lora.kohya_names_for(base)

    # --- schedule ----------------------------------------------------------------------
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        if self._alphas is None:
            raise ValueError("a flow-matching model has no VP schedule (alphas_cumprod); sample it with the "
                             "flow_sde policy")
        return self._alphas

    def flow_sigmas(self, steps: int) -> torch.Tensor:
        return flow_sigmas(self._model_sampling, steps)

    def latent_shape(self, height: int, width: int) -> Sequence[int]:
        channels = self.patcher.model.latent_format.latent_channels
        ratio = getattr(self.vae, "downscale_ratio", 8)
        ratio = ratio if isinstance(ratio, int) else 8   # video VAEs give a formula here
        if height % ratio or width % ratio:
            raise ValueError(f"{width}x{height}: width and height must be multiples of {ratio}")
        if getattr(self.patcher.model.latent_format, "latent_dimensions", 2) == 3:
            return (channels, 1, height // ratio, width // ratio)     # video-VAE models (Qwen-Image): one frame
        return (channels, height // ratio, width // ratio)

    # --- model management --------------------------------------------------------------
    def _load(self, batch_shape: Optional[Sequence[int]] = None) -> None:
        """Load the clone the way ComfyUI's samplers do and make it the current patcher."""
        import comfy.model_management
        import comfy.model_patcher
        import comfy.sampler_helpers

        if self._model_options is None:
            options = comfy.model_patcher.create_model_options_clone(self.patcher.model_options)
            comfy.sampler_helpers.prepare_model_patcher(self.patcher, {}, options)
            self._model_options = options
        memory = 0
        if batch_shape is not None:
            estimate = self.patcher.memory_required(list(batch_shape))
            memory = training_reserve(estimate, self._training_peak) if torch.is_grad_enabled() else estimate
        comfy.model_management.load_models_gpu([self.patcher], memory_required=memory)
        self.patcher.pre_run()
        self._loaded_batch = batch_shape[0] if batch_shape is not None else 0

    def _is_loaded(self, batch: int) -> bool:
        import comfy.model_management

        return (self.patcher.model.current_patcher is self.patcher
                and any(m is self.patcher for m in comfy.model_management.loaded_models())
                and batch <= self._loaded_batch)

    def prepare_for_sampling(self) -> None:
        self._end_training_measurement()
        self._load()

    def prepare_for_training(self) -> None:
        self._load()
        self._start_training_measurement()
        if self.gradient_checkpointing and self._checkpointing is None:
            self._checkpointing = BlockCheckpointing(self.patcher.model.diffusion_model, self._model_call)

    def prepare_for_scoring(self, reward_bytes: int) -> None:
        """The reward model goes onto the GPU outside ComfyUI's accounting: ComfyUI first frees
        that much (with headroom for the reward's activations), unloading models as it needs to,
        the training model included (it is loaded again for the next sampling phase)."""
        import comfy.model_management

        if reward_bytes > 0 and self.device.type == "cuda":
            comfy.model_management.free_memory(int(REWARD_MEMORY_HEADROOM * reward_bytes), self.device)

    def release(self) -> None:
        """Unload the clone and take this backend's wrappers off the shared modules."""
        import comfy.model_management

        if self._checkpointing is not None:
            self._checkpointing.remove()
            self._checkpointing = None
        if getattr(self, "_parameter_copies", None) is not None:
            self._parameter_copies.remove()
            self._parameter_copies = None
        for loaded in list(comfy.model_management.current_loaded_models):
            if loaded.model is self.patcher:
                loaded.model_unload()
                comfy.model_management.current_loaded_models.remove(loaded)
        ours = set(id(w) for w in self._wrappers) | {id(identity_weight)}
        for module in self.patcher.model.diffusion_model.modules():
            for attr in ("weight_function", "bias_function"):
                functions = getattr(module, attr, None)
                if functions:
                    setattr(module, attr, [f for f in functions if id(f) not in ours])
        if getattr(self.patcher.model, "current_patcher", None) is self.patcher:
            self.patcher.model.current_patcher = None

    def _start_training_measurement(self) -> None:
        """On CUDA: the update phase's peak memory above what is allocated now is measured."""
        if self.device.type == "cuda":
            self._training_baseline = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _end_training_measurement(self) -> None:
        """The last update phase's measured peak above its start (activations, merged weights,
        gradients, optimizer state) becomes the floor of the next training reserve."""
        if self._training_baseline is None:
            return
        peak = torch.cuda.max_memory_allocated(self.device) - self._training_baseline
        self._training_peak = max(self._training_peak, int(peak))
        self._training_baseline = None

    def stop_check_modules(self) -> List[torch.nn.Module]:
        return block_modules(self.patcher.model.diffusion_model)

    # --- model verbs -------------------------------------------------------------------
    @contextlib.contextmanager
    def interrupts_as_stop(self) -> Iterator[None]:
        """ComfyUI's interrupt raised by a model call -> ModelInterrupted, and `interrupted` set."""
        import comfy.model_management

        try:
            yield
        except comfy.model_management.InterruptProcessingException as interrupt:
            self.interrupted = True
            raise ModelInterrupted("Cancel pressed in ComfyUI") from interrupt

    @contextlib.contextmanager
    def _model_call(self) -> Iterator[None]:
        """Around every diffusion-model computation (forward, and recomputation in backward)."""
        with self.interrupts_as_stop(), comfy_training_mode():
            yield

    def denoise(self, x_sigma: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """ComfyUI's denoised x0 for x in sigma space, through calc_cond_batch.

        Flow transformers (and any model given token extras) attend jointly over text and
        image tokens, so a context repeated to a common length changes their output: rows are
        evaluated in groups of one true token count (row_groups), context and masks sliced
        to it, each row as the model gives it alone. UNets attend to the text by
        cross-attention, where repeating whole token blocks leaves softmax attention
        unchanged (ComfyUI batches this way too): one call on the repeated context, faster."""
        if not self._is_loaded(x_sigma.shape[0]):
            self._load(tuple(x_sigma.shape))
        joint = self.sampling_kind == "flow" or any(k in cond for k in TOKEN_EXTRAS)
        copies = saved_tensor_copies() if self.sampling_kind == "flow" and torch.is_grad_enabled() \
            else contextlib.nullcontext()
        with self._model_call(), copies:
            if not joint or "context_tokens" not in cond:
                return self._denoise_rows(x_sigma, sigma, cond, None)
            groups = row_groups(cond)
            if len(groups) == 1 and int(cond["context_tokens"][0]) == cond["context"].shape[1]:
                return self._denoise_rows(x_sigma, sigma, cond, None)
            outputs, order = [], []
            for rows in groups:
                outputs.append(self._denoise_rows(x_sigma, sigma, cond, rows))
                order += rows
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            return torch.cat(outputs)[inverse.to(outputs[0].device)]

    def _denoise_rows(self, x_sigma: torch.Tensor, sigma: torch.Tensor, cond: Cond,
                      rows: Optional[List[int]]) -> torch.Tensor:
        """One calc_cond_batch call on `rows` (all rows when None), the context and token
        extras sliced to the rows' common true token count (one mask row: ComfyUI repeats it)."""
        import comfy.samplers

        device = x_sigma.device
        context = cond["context"].to(device)
        if rows is not None:
            index = torch.tensor(rows, device=device)
            tokens = int(cond["context_tokens"][rows[0]])
            x_sigma, sigma, context = x_sigma[index], sigma[index], context[index, :tokens]
        # pooled_output is always in the entry, None where the CLIP gives none (Chroma's T5), as
        # in ComfyUI's conditioning: some models' encode_adm index it (Chroma on 0.3.64)
        entry = {"cross_attn": context, "model_conds": {}, "uuid": uuid.uuid4(), "pooled_output": None}
        if "pooled_output" in cond:
            pooled = cond["pooled_output"].to(device)
            entry["pooled_output"] = pooled if rows is None else pooled[index]
        for key in TOKEN_EXTRAS:
            if key in cond:
                value = cond[key].to(device)
                first = 0 if rows is None else rows[0]        # the rows share it (row_groups)
                entry[key] = value[first:first + 1, :value.shape[1] if rows is None else tokens]
        if self.guidance is not None:
            entry["guidance"] = self.guidance              # as FluxGuidance writes it
        base = self.patcher.model
        conds = comfy.samplers.encode_model_conds(base.extra_conds, [entry], x_sigma, device, "positive")
        return comfy.samplers.calc_cond_batch(base, [conds], x_sigma, sigma, self._model_options)[0]

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """VP: the noise prediction at integer timesteps t; flow: the denoised x0 at sigmas t
        (the latent is ComfyUI's x_sigma itself: no input rescaling)."""
        if self.sampling_kind != "flow":
            return self.predict_eps(x, t, cond)
        return self.denoise(x.float(), t.to(x.device, torch.float32), cond)

    def predict_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        if self._sigmas is None:
            raise ValueError("a flow-matching model has no VP noise prediction; use predict (x0)")
        sigma = self._sigmas[t.long().cpu()].to(x.device)
        scale = (1.0 + sigma ** 2).sqrt().view(-1, *([1] * (x.dim() - 1)))
        x_sigma = x.float() * scale                       # = x_vp / sqrt(a_t)
        x0 = self.denoise(x_sigma, sigma, cond).float()
        return (x_sigma - x0) / sigma.view_as(scale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self.interrupts_as_stop(), torch.inference_mode():   # as VAEDecode does (module docstring: Inference mode)
            raw = self.patcher.model.process_latent_out(latents.detach().float())
            images = self.vae.decode(raw)
            if images.dim() == 5:          # video VAEs: [n, frames, H, W, C]
                images = images[:, 0]
            images = images[..., :3].float().cpu().clamp(0, 1)
        return ordinary(images)

    # --- the LoRA ----------------------------------------------------------------------
    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        params = []
        for wrapper in self.adapters.values():
            params += [wrapper.adapter.lora_up.weight, wrapper.adapter.lora_down.weight]
        return params

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        previous = self.switch.enabled
        self.switch.enabled = False
        try:
            yield
        finally:
            self.switch.enabled = previous

    def factors(self) -> Dict[str, comfy_lora.LoraFactors]:
        return {name: comfy_lora.LoraFactors(w.adapter.lora_down.weight, w.adapter.lora_up.weight,
                                             float(w.adapter.alpha))
                for name, w in self.adapters.items()}

    def lora_state_dict(self) -> Dict[str, torch.Tensor]:
        return comfy_lora.to_kohya(self.factors(), self._ldm_to_diffusers)

    def lora_model(self) -> Dict[str, torch.Tensor]:
        """The LoRA as ComfyUI's LORA_MODEL dict."""
        return comfy_lora.to_lora_model(self.factors())

    def load_lora_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        factors = comfy_lora.from_state_dict(state, self.adapters, self._ldm_to_diffusers)
        missing = sorted(set(self.adapters) - set(factors))
        if missing:
            raise ValueError(f"the LoRA has no weights for {len(missing)} trained module(s), e.g. {missing[0]}; "
                             "resume with a checkpoint of the same model and LoRA targets")
        with torch.inference_mode(False), torch.no_grad():
            for name, f in factors.items():
                adapter = self.adapters[name].adapter
                if tuple(f.down.shape) != tuple(adapter.lora_down.weight.shape) or \
                        tuple(f.up.shape) != tuple(adapter.lora_up.weight.shape):
                    raise ValueError(f"LoRA shapes for {name} ({tuple(f.down.shape)}, {tuple(f.up.shape)}) do not "
                                     f"match this run (rank {self.rank}); use the checkpoint's lora_rank")
                adapter.lora_down.weight.copy_(f.down)
                adapter.lora_up.weight.copy_(f.up)
                adapter.alpha.fill_(f.alpha)

    def lora_info(self) -> Dict[str, object]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
                "modules": len(self.adapters), "base_model": self.model_name,
                "family": model_families.comfy_model_family(self.source_model)}
