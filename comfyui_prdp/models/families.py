"""Which base-model family a model belongs to: its native training size and the names LoRA
tools display for it (kohya `ss_base_model_version`, as sd-scripts writes it and A1111/Forge,
ComfyUI-Manager and civitai read it to tell SD1.x, SD2.x and SDXL LoRAs apart).

Families are read from what the host already decided: ComfyUI's detected model config class
(`comfy.supported_models`, e.g. `SDXL`, `SD20`) and model type (EPS / V_PREDICTION), or a
diffusers pipeline's parts (two text encoders = SDXL; the scheduler's prediction_type).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

DEFAULT_SIZE = 512      # the size of a family no tool knows
NATIVE_SIZE = 0         # a width/height of 0 (the train node's default): the model's native size


@dataclass(frozen=True)
class ModelFamily:
    name: str                        # shown to people: "SDXL", "SD2.x 768-v", ...
    native_size: int                 # the square resolution the base model was trained at
    kohya_version: Optional[str]     # ss_base_model_version; None where no tool knows the family
    v_prediction: bool = False

    @property
    def is_sdxl(self) -> bool:
        return bool(self.kohya_version and self.kohya_version.startswith("sdxl"))

    def metadata(self) -> Dict[str, str]:
        """kohya `ss_*` keys naming the base family (strings, as safetensors metadata needs)."""
        if self.kohya_version is None:
            return {"ss_v_parameterization": str(self.v_prediction)}
        return {"ss_base_model_version": self.kohya_version,
                "ss_v2": str(self.kohya_version.startswith("sd_v2")),
                "ss_v_parameterization": str(self.v_prediction)}


SD1 = ModelFamily("SD1.x", 512, "sd_v1")
SD2 = ModelFamily("SD2.x", 512, "sd_v2")
SD2_V = ModelFamily("SD2.x 768-v", 768, "sd_v2_768_v", v_prediction=True)
SDXL = ModelFamily("SDXL", 1024, "sdxl_base_v1-0")
SDXL_V = ModelFamily("SDXL v-prediction", 1024, "sdxl_base_v1-0", v_prediction=True)
# rectified-flow transformers (kohya sd-scripts writes "sd3" / "flux1" for their LoRAs)
SD3 = ModelFamily("SD3", 1024, "sd3")
SD35 = ModelFamily("SD3.5", 1024, "sd3")
FLUX_DEV = ModelFamily("Flux.1-dev", 1024, "flux1")
FLUX_SCHNELL = ModelFamily("Flux.1-schnell", 1024, "flux1")

#: ComfyUI model configs of the SDXL architecture family (same UNet layout or distilled from it)
COMFY_SDXL_CONFIGS = ("SDXL", "SDXLRefiner", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B",
                      "SDXL_instructpix2pix")
COMFY_SD2_CONFIGS = ("SD20", "SD21UnclipL", "SD21UnclipH")
COMFY_SD1_CONFIGS = ("SD15", "SD15_instructpix2pix")


def comfy_family(config_name: str, v_prediction: bool) -> ModelFamily:
    """The family of a ComfyUI model config class name and its parameterisation."""
    if config_name in COMFY_SDXL_CONFIGS:
        return SDXL_V if v_prediction else SDXL
    if config_name in COMFY_SD2_CONFIGS:
        return SD2_V if v_prediction else SD2
    if config_name in COMFY_SD1_CONFIGS:
        return ModelFamily("SD1.x v-prediction", 512, "sd_v1", True) if v_prediction else SD1
    return ModelFamily(config_name, DEFAULT_SIZE, None, v_prediction)


def comfy_model_family(model) -> ModelFamily:
    """The family of a ComfyUI MODEL (ModelPatcher), v-prediction read from its model sampling
    (a ModelSamplingDiscrete node upstream counts)."""
    import comfy.model_sampling  # ComfyUI only

    if not hasattr(model, "get_model_object") or not hasattr(getattr(model, "model", None), "model_config"):
        return ModelFamily("unknown", DEFAULT_SIZE, None)     # not a MODEL: the backend says so
    config_name = type(model.model.model_config).__name__
    sampling = model.get_model_object("model_sampling")
    return comfy_family(config_name, isinstance(sampling, comfy.model_sampling.V_PREDICTION))


def diffusers_family(is_sdxl: bool, v_prediction: bool, cross_attention_dim: int = 768) -> ModelFamily:
    """SDXL (two text encoders), SD2.x (1024-wide text embeddings: OpenCLIP-H) or SD1.x."""
    if is_sdxl:
        return SDXL_V if v_prediction else SDXL
    if cross_attention_dim == 1024:
        return SD2_V if v_prediction else SD2
    return comfy_family("SD15", v_prediction)


def diffusers_flow_family(architecture: str, sd35: bool = False, guidance_distilled: bool = True) -> ModelFamily:
    """SD3 / SD3.5 (dual attention or qk-norm transformer) or Flux.1-dev (guidance embedding) /
    Flux.1-schnell, from a diffusers flow transformer's config."""
    if architecture == "sd3":
        return SD35 if sd35 else SD3
    if architecture == "flux":
        return FLUX_DEV if guidance_distilled else FLUX_SCHNELL
    raise ValueError(f"unknown flow architecture {architecture!r}: use 'sd3' or 'flux'")


def training_size(width: int, height: int, family: ModelFamily) -> tuple:
    """(width, height) to train at: a side given as NATIVE_SIZE (0, the node's default) is
    the family's native size; any other value is kept (512 on SDXL trains at 512)."""
    return tuple(family.native_size if side == NATIVE_SIZE else side for side in (width, height))
