"""The PRDP Train LoRA form: widgets, their checks, and turning them into a TrainConfig.

Pure Python (no ComfyUI), so VALIDATE_INPUTS can run before any model is loaded and tests can
call it directly.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..comfyui_prdp.config import PRESETS, TrainConfig, preset as preset_config
from ..comfyui_prdp.models.families import NATIVE_SIZE    # width/height 0 (the default): native size
from ..comfyui_prdp.prompts import PromptTextError, parse_prompt_text
from .common import widget_problem

DEFAULT_PRESET = "consumer-gpu" if "consumer-gpu" in PRESETS else next(iter(PRESETS))
DEFAULT_PROMPTS = "\n".join([
    "a photo of a cat", "a photo of a dog", "a photo of a horse", "a photo of a rabbit",
    "a photo of a fox", "a photo of an owl", "a photo of a deer", "a photo of a panda",
])
MAX_STEPS = 1000
MAX_SIZE = 2048                  # SD1.x/2.x are trained at 512-768; 2048 already needs a large GPU
MIN_SIZE = 64
SIZE_WIDGETS = ("width", "height")
#: flow_guidance -1 (the default): the preset's value, or the model's own default where it sets none
PRESET_GUIDANCE = -1.0
MAX_GUIDANCE = 100.0             # FluxGuidance's own maximum
#: the CPU memory one epoch's trajectories and decoded images may take (a shared server's limit)
MAX_EPOCH_MEMORY_BYTES = 16 * 2 ** 30

#: (min, max) of the numeric widgets: INPUT_TYPES declares them, VALIDATE_INPUTS and
#: build_config (run time: a widget fed by a link skips VALIDATE_INPUTS) enforce them
LIMITS = {
    "epochs": (1, 100000), "prompts_per_epoch": (1, 4096), "images_per_prompt": (2, 256),
    "steps": (1, MAX_STEPS), "cfg": (1.0, 30.0), "beta": (1e-9, 10.0), "clip_range": (1e-9, 10.0),
    "updates_per_epoch": (1, 1000), "learning_rate": (1e-9, 1.0), "lora_rank": (1, 256),
    "width": (NATIVE_SIZE, MAX_SIZE), "height": (NATIVE_SIZE, MAX_SIZE), "seed": (0, 0xFFFFFFFFFFFFFFFF),
    "checkpoint_every": (0, 100000), "flow_guidance": (PRESET_GUIDANCE, MAX_GUIDANCE),
}

#: widget name -> TrainConfig field (same name unless listed)
CONFIG_WIDGETS = ("epochs", "prompts_per_epoch", "images_per_prompt", "steps", "cfg", "beta",
                  "clip_range", "updates_per_epoch", "learning_rate", "lora_rank", "width", "height",
                  "seed", "negative_prompt", "checkpoint_every", "algorithm", "flow_guidance")


def parse_prompts(text: Optional[str], source: str = "prompts") -> List[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped. ValueError for
    text that is no prompt list (NUL bytes, a line longer than any prompt)."""
    if not text:
        return []
    return parse_prompt_text(str(text), source)


def limit_problem(name: str, value: Any) -> Optional[str]:
    """What is wrong with a numeric widget value against LIMITS (None when fine or not numeric);
    a width/height is 0 (native) or at least MIN_SIZE, a flow_guidance -1 (the preset's) or at least 0."""
    if name not in LIMITS:
        return None
    low, high = LIMITS[name]
    kind = "INT" if isinstance(low, int) else "FLOAT"
    problem = widget_problem(name, kind, {"min": low, "max": high}, value)
    if problem is None and name in SIZE_WIDGETS and NATIVE_SIZE < value < MIN_SIZE:
        problem = f"{name}={value}: at least {MIN_SIZE} (or {NATIVE_SIZE} for the model's native size)"
    if problem is None and name == "flow_guidance" and PRESET_GUIDANCE < value < 0:
        problem = f"{name}={value}: at least 0 (or {PRESET_GUIDANCE:g} for the preset's value)"
    return problem


def epoch_memory_bytes(config: TrainConfig) -> int:
    """CPU memory of one epoch's data: float32 latent trajectories (T+1 latents of 4 x h/8 x w/8
    each) and the decoded RGB images, for every sampled image."""
    images = config.prompts_per_epoch * config.images_per_prompt
    latent = 4 * (config.height // 8) * (config.width // 8)
    return images * ((config.steps + 1) * latent + 3 * config.height * config.width) * 4


def memory_problem(config: TrainConfig) -> Optional[str]:
    needed = epoch_memory_bytes(config)
    if needed <= MAX_EPOCH_MEMORY_BYTES:
        return None
    return (f"one epoch would hold {needed / 2 ** 30:.0f} GiB of images and trajectories (at most "
            f"{MAX_EPOCH_MEMORY_BYTES // 2 ** 30} GiB): lower prompts_per_epoch, images_per_prompt, steps "
            "or the image size")


def build_config(preset: str, **widgets: Any) -> TrainConfig:
    """The preset's values for everything not on the node, overridden by the widget values
    that are given (None, or a flow_guidance of PRESET_GUIDANCE: keep the preset's). Raises
    ValueError naming every bad value.

    A width/height of NATIVE_SIZE keeps the preset's too: the node resolves it to the model's
    native size before its run-time call, so only VALIDATE_INPUTS (no model yet) passes it."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: choose one of {', '.join(PRESETS)}")
    overrides = {name: widgets[name] for name in CONFIG_WIDGETS if widgets.get(name) is not None}
    problems = [limit_problem(name, value) for name, value in overrides.items() if limit_problem(name, value)]
    if problems:    # the checks below assume numbers in range
        raise ValueError("; ".join(problems))
    for name in SIZE_WIDGETS:
        if overrides.get(name) == NATIVE_SIZE:
            del overrides[name]
    if overrides.get("flow_guidance") == PRESET_GUIDANCE:
        del overrides["flow_guidance"]
    try:
        config = preset_config(preset, **overrides)
    except ValueError as error:
        problems.append(str(error).replace("invalid training configuration:\n  - ", "").replace("\n  - ", "; "))
        config = None
    if config is not None and memory_problem(config):
        problems.append(memory_problem(config))
    if problems:
        raise ValueError("; ".join(problems))
    return config


def validate_form(prompts: Optional[str], prompt_file_given: bool, preset: str,
                  lora_name_error: Optional[str], **widgets: Any) -> List[str]:
    """Everything that is wrong with the form (empty when it is fine).

    `prompts` is None when the prompts come through a link (checked again at run time).
    """
    messages = []
    if prompts is not None:
        try:
            if not parse_prompts(prompts) and not prompt_file_given:
                messages.append("no prompts: write at least one prompt in 'prompts' (one per line) "
                                "or choose a prompt_file")
        except PromptTextError as error:
            messages.append(str(error))
    if lora_name_error:
        messages.append(lora_name_error)
    try:
        build_config(preset, **widgets)
    except ValueError as error:
        messages.append(str(error))
    return messages


def config_summary(config: TrainConfig, prompt_count: int) -> Dict[str, Any]:
    """What a job reports about its settings."""
    keys = ("algorithm", "epochs", "prompts_per_epoch", "images_per_prompt", "updates_per_epoch",
            "steps", "cfg", "beta", "clip_range", "learning_rate", "lora_rank", "width", "height", "seed", "flow_guidance")
    summary = {key: getattr(config, key) for key in keys}
    summary["prompts"] = prompt_count
    return summary
