"""LoRA factors of a ComfyUI model <-> the two dict formats the plugin hands out.

- kohya keys with diffusers module naming (the file format: sd-scripts, A1111/Forge, ComfyUI's
  LoraLoader and diffusers' `load_lora_weights` read it):
  `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`,
  `.lora_up.weight`, `.alpha`;
- ComfyUI's LORA_MODEL dict (what core "Train LoRA" emits and "Load LoRA Model" / "Save LoRA
  Weights" accept): `diffusion_model.<ldm module>.lora_up.weight`, `.lora_down.weight`, `.alpha`.

Modules are named here as ComfyUI names them inside the UNet (ldm naming, relative to
`diffusion_model`), e.g. `input_blocks.1.1.transformer_blocks.0.attn1.to_q`. The ldm -> diffusers
map comes from `comfy.utils.unet_to_diffusers`; a module it does not cover keeps its ldm name in
the kohya key (`lora_unet_input_blocks_1_1_...`), which ComfyUI and A1111 also read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional

import torch

KOHYA_PREFIX = "lora_unet_"
LORA_MODEL_PREFIX = "diffusion_model."
DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"


@dataclass
class LoraFactors:
    """One module's LoRA: delta W = (alpha / rank) * up @ down."""
    down: torch.Tensor   # [rank, in_features]
    up: torch.Tensor     # [out_features, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def ldm_to_diffusers_names(unet_config: Mapping) -> Dict[str, str]:
    """ldm module name -> diffusers module name for every module ComfyUI can map (lazy import)."""
    import comfy.utils  # ComfyUI only

    names: Dict[str, str] = {}
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(dict(unet_config)).items():
        if diffusers_key.endswith(".weight") and ldm_key.endswith(".weight"):
            names[ldm_key[: -len(".weight")]] = diffusers_key[: -len(".weight")]
    return names


def is_unet(diffusion_model) -> bool:
    """Whether ComfyUI's diffusion model is the SD-style UNet (SD1.x/SD2.x/SDXL layouts), whatever
    its model sampling (eps, v, or a ModelSamplingSD3 / Flux node's flow) (lazy import)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel  # ComfyUI only

    return isinstance(diffusion_model, UNetModel)


def kohya_names_for(base_model) -> Dict[str, str]:
    """The ldm -> diffusers map of a ComfyUI BaseModel's kohya keys, chosen by architecture:
    a UNet's modules get diffusers names (what A1111/Forge and sd-scripts read); transformers
    keep ComfyUI's names (`lora_unet_double_blocks_0_img_attn_qkv`), which LoraLoader maps."""
    if is_unet(base_model.diffusion_model):
        return ldm_to_diffusers_names(base_model.model_config.unet_config)
    return {}


def kohya_module_key(ldm_name: str, ldm_to_diffusers: Mapping[str, str]) -> str:
    """`input_blocks.1.1.transformer_blocks.0.attn1.to_q` -> `lora_unet_down_blocks_0_..._to_q`."""
    name = ldm_to_diffusers.get(ldm_name, ldm_name)
    return KOHYA_PREFIX + name.replace(".", "_")


def _tensor(value: torch.Tensor) -> torch.Tensor:
    return value.detach().to("cpu", torch.float32).clone().contiguous()


def to_kohya(factors: Mapping[str, LoraFactors], ldm_to_diffusers: Mapping[str, str]) -> Dict[str, torch.Tensor]:
    """kohya state dict (float32, CPU) of {ldm module name: factors}; always writes `.alpha`."""
    state: Dict[str, torch.Tensor] = {}
    for ldm_name, f in factors.items():
        key = kohya_module_key(ldm_name, ldm_to_diffusers)
        if f"{key}.{DOWN}" in state:
            raise ValueError(f"two modules map to the same LoRA key {key!r}")
        state[f"{key}.{DOWN}"] = _tensor(f.down)
        state[f"{key}.{UP}"] = _tensor(f.up)
        state[f"{key}.{ALPHA}"] = torch.tensor(float(f.alpha), dtype=torch.float32)
    return state


def to_lora_model(factors: Mapping[str, LoraFactors]) -> Dict[str, torch.Tensor]:
    """ComfyUI's LORA_MODEL dict of {ldm module name: factors}."""
    state: Dict[str, torch.Tensor] = {}
    for ldm_name, f in factors.items():
        key = LORA_MODEL_PREFIX + ldm_name
        state[f"{key}.{UP}"] = _tensor(f.up)
        state[f"{key}.{DOWN}"] = _tensor(f.down)
        state[f"{key}.{ALPHA}"] = torch.tensor(float(f.alpha), dtype=torch.float32)
    return state


def from_state_dict(state: Mapping[str, torch.Tensor], module_names: Iterable[str],
                    ldm_to_diffusers: Mapping[str, str]) -> Dict[str, LoraFactors]:
    """Parse a kohya (diffusers or ldm naming) or LORA_MODEL dict into {ldm module: factors}.

    Every key must belong to one of `module_names` and every module found needs both factors:
    a LoRA made for another model or other targets fails loudly instead of loading partly.
    A missing `.alpha` means scale 1 (alpha = rank), as ComfyUI reads it.
    """
    lookup: Dict[str, str] = {}
    for ldm_name in module_names:
        lookup[kohya_module_key(ldm_name, ldm_to_diffusers)] = ldm_name
        lookup[KOHYA_PREFIX + ldm_name.replace(".", "_")] = ldm_name
        lookup[LORA_MODEL_PREFIX + ldm_name] = ldm_name
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        for suffix in (DOWN, UP, ALPHA):
            if key.endswith("." + suffix):
                module = lookup.get(key[: -len(suffix) - 1])
                if module is not None:
                    parts.setdefault(module, {})[suffix] = value
                    break
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:4]) + (" ..." if len(unknown) > 4 else "")
        raise ValueError(f"{len(unknown)} LoRA key(s) match no trained module of this model ({shown}); "
                         "was the LoRA made for another model or with other target modules?")
    factors: Dict[str, LoraFactors] = {}
    for module, found in parts.items():
        if DOWN not in found or UP not in found:
            raise ValueError(f"LoRA module {module} lacks its lora_down or lora_up weight; the file is incomplete")
        down, up = found[DOWN], found[UP]
        alpha: Optional[torch.Tensor] = found.get(ALPHA)
        factors[module] = LoraFactors(down, up, float(alpha) if alpha is not None else float(down.shape[0]))
    return factors
