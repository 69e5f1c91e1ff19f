"""The interface between the algorithm and a host's model objects.

The sampler, the objective and the trainer only ever talk to a `Backend`. A backend adapts
one host (diffusers, ComfyUI) to a handful of verbs; nothing above it knows which host runs.

Conventions every backend follows:
- `sampling_kind` says how its model samples, which picks the policy (policies/):
  "vp": latents in variance-preserving form, x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps, where
  a_t = `alphas_cumprod[t]` and t is an integer training timestep (0..len-1);
  "flow": rectified flow, x_sigma = (1 - sigma) * x0 + sigma * noise, sigma in [0, 1], with the
  model's own schedule from `flow_sigmas(steps)`; no input rescaling.
- `predict(x, t, cond)` answers in the model's own terms, named by `prediction`: "eps" (noise),
  "x0" (denoised, e.g. ComfyUI's apply_model) or "velocity" (flow: noise - x0). t is what the
  policy's schedule holds: integer timesteps (vp) or sigmas (flow). The policy converts.
- Conditioning is a `Cond`: a dict of batch-first tensors (e.g. {"context": [n, 77, 768]},
  SDXL adds pooled outputs), so the sampler can index, repeat and concatenate it generically.
- `predict_eps` (vp backends) returns the noise prediction for a batch (eps- and v-prediction
  models alike: the backend converts), in any dtype; the sampler casts to float32. The default
  `predict` is `predict_eps`.
- While `adapters_disabled()` is active the model is the frozen base model (the LoRA has no
  effect); this is how reference log-probs are computed without a second copy of the model.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Sequence

import torch

Cond = Dict[str, torch.Tensor]


class Backend:
    """Abstract backend. Subclasses implement every method that raises NotImplementedError."""

    #: device the model computes on
    device: torch.device = torch.device("cpu")
    #: dtype the model computes in (log-probs are always float64)
    dtype: torch.dtype = torch.float32
    #: a short human-readable name of the base model, written into LoRA metadata
    model_name: str = "unknown"
    #: "vp" (discrete DDPM schedule) or "flow" (rectified flow); see the module docstring
    sampling_kind: str = "vp"
    #: what `predict` returns: "eps", "x0" or "velocity"
    prediction: str = "eps"

    # --- schedule -----------------------------------------------------------------------
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """vp backends: float64 tensor [num_train_timesteps] of the VP schedule, on the CPU."""
        raise NotImplementedError

    def flow_sigmas(self, steps: int) -> torch.Tensor:
        """flow backends: float64 [steps + 1] sigmas from 1 down to 0 (the model's own shift)."""
        raise NotImplementedError(f"{type(self).__name__} is not a flow-matching backend")

    def latent_shape(self, height: int, width: int) -> Sequence[int]:
        """(channels, h, w) of the latent for an image of height x width pixels."""
        raise NotImplementedError

    # --- model verbs --------------------------------------------------------------------
    def encode_prompts(self, prompts: List[str]) -> Cond:
        """Text conditioning for each prompt, batch-first, on `device`, no grad needed."""
        raise NotImplementedError

    def predict_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Noise prediction for VP latents x [n, C, h, w] at integer timesteps t [n]."""
        raise NotImplementedError

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The model's prediction (kind `prediction`) at latents x [n, C, h, w] and times t [n]."""
        return self.predict_eps(x, t, cond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """x0 latents [n, C, h, w] -> images [n, H, W, 3] float32 in 0..1 on the CPU."""
        raise NotImplementedError

    # --- the LoRA -----------------------------------------------------------------------
    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        raise NotImplementedError

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Inside this context the LoRA has no effect (the frozen base model)."""
        raise NotImplementedError
        yield  # pragma: no cover

    def lora_state_dict(self) -> Dict[str, torch.Tensor]:
        """The LoRA in kohya format with diffusers module naming, float32 on the CPU:
        `lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
        raise NotImplementedError

    def load_lora_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Inverse of `lora_state_dict` (used to resume from a checkpoint)."""
        raise NotImplementedError

    def lora_info(self) -> Dict[str, object]:
        """rank, alpha, target modules: written into LoRA metadata."""
        return {}

    # --- stopping inside a model evaluation ---------------------------------------------
    def stop_check_modules(self) -> List[torch.nn.Module]:
        """Modules before whose forward a requested stop takes effect (the denoiser's blocks,
        see `block_modules`): a stop then waits for one block, not for a whole batched step,
        which for a big model at a big size can take minutes. None by default."""
        return []

    # --- memory hooks (no-ops by default) ---------------------------------------------
    def prepare_for_sampling(self) -> None:
        """Called before a sampling/evaluation phase (e.g. load the model to the GPU)."""

    def prepare_for_training(self) -> None:
        """Called before a gradient phase."""

    def prepare_for_scoring(self, reward_bytes: int) -> None:
        """Called before the reward phase with the bytes the reward model will put on the device
        (e.g. free the host's model memory so that it fits)."""


def block_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    """Every element of every ModuleList inside `model`, and each element's direct children: a
    denoiser's blocks and their parts (UNet down/up blocks, their resnets and attentions; a DiT's
    transformer blocks). The children because a block may never be called itself: ComfyUI's UNet
    calls the layers of each TimestepEmbedSequential one by one."""
    blocks = [block for module in model.modules() if isinstance(module, torch.nn.ModuleList) for block in module]
    found = {id(block) for block in blocks}
    parts = [child for block in blocks for child in block.children() if id(child) not in found]
    return blocks + list({id(part): part for part in parts}.values())
