"""Apply LoRA (PRDP): MODEL + LORA_MODEL + strength -> MODEL (a patched copy)."""
from __future__ import annotations

from .common import CATEGORY, LORA_MODEL_TYPE, refuse, widget_problems


class PRDPApplyLoRA:
    DESCRIPTION = ("Applies a LoRA held in memory (the 'lora' output of PRDP Train LoRA or core Train "
                   "LoRA) to a model. The input model is not changed.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to apply the LoRA to."}),
                "lora": (LORA_MODEL_TYPE, {"tooltip": "The LoRA (LORA_MODEL) to apply."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "How strongly to apply it; 0 returns the model unchanged, "
                                                  "negative values push the other way."}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied.",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, strength=None):
        """ComfyUI's own min/max check lets NaN through (every comparison with NaN is false)."""
        refuse("Apply LoRA (PRDP)", list(widget_problems(cls.INPUT_TYPES(), {"strength": strength}).values()))
        return True

    def apply(self, model, lora, strength):
        if strength == 0:
            return (model,)
        import comfy.sd  # ComfyUI only

        if not isinstance(lora, dict) or not lora:
            raise ValueError("lora: expected a LoRA state dict (LORA_MODEL); connect the lora output of a "
                             "training node")
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
        return (patched,)
