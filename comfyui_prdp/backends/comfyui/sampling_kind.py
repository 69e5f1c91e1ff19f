"""Which kind of model sampling a ComfyUI model uses (VP or rectified flow), its sigma
tables, and the architectures and samplings that are refused."""
from __future__ import annotations

from typing import Optional

import torch

#: flow-matching parameterisations and schedules of comfy.model_sampling (CONST: SD3, Flux, ...)
FLOW_SAMPLING_CLASSES = ("CONST", "COSMOS_RFLOW", "ModelSamplingDiscreteFlow", "ModelSamplingFlux",
                         "ModelSamplingAV", "ModelSamplingCosmosRFlow")
#: the flow schedules the flow-SDE policy samples (a sigma table, 1 -> 0, with CONST: flow_sigmas)
TRAINED_FLOW_SCHEDULES = ("ModelSamplingDiscreteFlow", "ModelSamplingFlux")


def flow_sampling_base(sampling) -> Optional[str]:
    """The name of the flow-matching class `sampling` derives from, or None.

    ComfyUI builds every model-sampling object as a class named `ModelSampling` mixing a
    schedule and a parameterisation, so the test is isinstance, never the class name.
    """
    import comfy.model_sampling

    for name in FLOW_SAMPLING_CLASSES:
        cls = getattr(comfy.model_sampling, name, None)   # not every class exists in every version
        if cls is not None and isinstance(sampling, cls):
            return name
    return None


def sampling_bases(sampling) -> str:
    return " + ".join(c.__name__ for c in type(sampling).__bases__) or type(sampling).__name__


def is_trained_flow(sampling) -> bool:
    """CONST (rectified flow, x0 = x - v sigma) with a 1 -> 0 flow schedule the policy samples."""
    import comfy.model_sampling

    const = getattr(comfy.model_sampling, "CONST", None)
    schedules = tuple(getattr(comfy.model_sampling, n) for n in TRAINED_FLOW_SCHEDULES
                      if hasattr(comfy.model_sampling, n))
    return const is not None and isinstance(sampling, const) and bool(schedules) and \
        isinstance(sampling, schedules) and isinstance(getattr(sampling, "sigmas", None), torch.Tensor)


def sampling_kind(sampling) -> str:
    """"vp" or "flow" for a model sampling PRDP trains, else a one-line ValueError naming it."""
    if flow_sampling_base(sampling) is not None:
        if is_trained_flow(sampling):
            check_unit_noise_scale(sampling)
            return "flow"
        raise ValueError(f"this model's flow sampling ({sampling_bases(sampling)}) is not rectified flow with a "
                         "1 -> 0 schedule (CONST + ModelSamplingDiscreteFlow / ModelSamplingFlux, as SD3, Flux, "
                         "Lumina2, Qwen-Image); PRDP cannot sample it with log-probs")
    import comfy.model_sampling

    discrete = getattr(comfy.model_sampling, "ModelSamplingDiscrete", None)
    if discrete is None or not isinstance(sampling, discrete):
        raise ValueError(f"this model's sampling ({sampling_bases(sampling)}) is neither a discrete DDPM schedule "
                         "(eps / v-prediction: SD1.x/SD2.x/SDXL) nor rectified flow (SD3, Flux, ...); PRDP cannot "
                         "sample it with log-probs (a continuous EDM / v model-sampling node upstream?)")
    vp_sigmas(sampling)
    return "vp"


def check_unit_noise_scale(sampling) -> None:
    """ComfyUI's CONST sampling may scale the noise (`noise_scale`: x_sigma = sigma s noise +
    (1 - sigma) x0, and its samplers' SDE noise; HiDream-O1 sets 8): the flow policy starts from
    and steps with unit noise, so any other scale is refused in one line."""
    scale = getattr(sampling, "noise_scale", 1.0)
    if float(scale) != 1.0:
        raise ValueError(f"this model's flow sampling has noise_scale {float(scale):g} (HiDream-O1 sets 8), "
                         "which scales its starting noise; PRDP's flow policy samples from unit noise and "
                         "trains only models with noise_scale 1")


def flow_sigmas(sampling, steps: int) -> torch.Tensor:
    """float64 [steps + 1]: the schedule KSampler samples with scheduler "simple" (ComfyUI's
    flow-model default), so training sees the images users compare with ComfyUI's samplers.

    ComfyUI keeps the model's shifted schedule (its shift, or a ModelSamplingSD3 / Flux node's)
    as a table of sigmas at t = 1/n ... n/n; "simple" takes `steps` entries from its top down,
    entry n - 1 - floor(i * (n / steps)) for step i (the product in floating point, as ComfyUI
    takes it), then 0. That equals percent_to_sigma(i / steps) only where `steps` divides n (SD3
    at 12, 16 or 28 steps differs by 1-2e-3). Values are the table's (float32) in float64."""
    if not is_trained_flow(sampling):
        raise ValueError(f"this model's sampling ({sampling_bases(sampling)}) is not a rectified-flow schedule")
    with torch.inference_mode(False):
        table = sampling.sigmas.detach().to("cpu", torch.float32).clone()
    spacing = len(table) / steps
    picks = [float(table[len(table) - 1 - int(step * spacing)]) for step in range(steps)]
    return torch.tensor(picks + [0.0], dtype=torch.float64)


#: ComfyUI model classes (comfy.model_base) PRDP does not train: HiDream's encoder always adds
#: Llama features (`conditioning_llama3`) that are not passed to the model here
UNSUPPORTED_ARCHITECTURES = ("HiDream", "HiDreamO1")


def refuse_unsupported_architecture(base_model) -> None:
    """A one-line ValueError for a model PRDP cannot train (UNSUPPORTED_ARCHITECTURES), before any work."""
    import comfy.model_base

    for name in UNSUPPORTED_ARCHITECTURES:
        cls = getattr(comfy.model_base, name, None)      # not every class exists in every version
        if cls is not None and isinstance(base_model, cls):
            raise ValueError(f"HiDream is not supported by PRDP (this MODEL is ComfyUI's {name}): its text "
                             "encoder's Llama features are not passed to the model; train SD1.x/SDXL, SD3/3.5, "
                             "Flux, Chroma, Lumina2/Z-Image or Qwen-Image instead")


def vp_sigmas(sampling) -> torch.Tensor:
    """The discrete sigma schedule of an eps / v-prediction model sampling (CPU float32), or a
    ValueError for flow models and anything else that is not a discrete DDPM schedule."""
    bases = sampling_bases(sampling)
    if flow_sampling_base(sampling) is not None:
        raise ValueError(f"this model samples with flow matching ({bases}: SD3, Flux, Qwen-Image, ...), which has "
                         "no discrete DDPM schedule; it is trained with the flow_sde policy (flow_sigmas)")
    sigmas = getattr(sampling, "sigmas", None)
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or len(sigmas) < 2:
        raise ValueError(f"this model's sampling ({bases}) is not a discrete "
                         "DDPM schedule; PRDP training supports SD1.x/SD2.x/SDXL-style UNet models and rectified-flow "
                         "models (SD3, Flux, Lumina2, Qwen-Image, ...)")
    with torch.inference_mode(False):
        return sigmas.detach().to("cpu", torch.float32).clone()
