"""The PRDP Train LoRA form: widgets, their checks, and turning them into a TrainConfig.

Pure Python (no ComfyUI), so VALIDATE_INPUTS can run before any model is loaded and tests can
call it directly.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..comfyui_prdp.config import PRESETS, TrainConfig, preset as preset_config

DEFAULT_PRESET = "consumer-gpu" if "consumer-gpu" in PRESETS else next(iter(PRESETS))
DEFAULT_PROMPTS = "\n".join([
    "a photo of a cat", "a photo of a dog", "a photo of a horse", "a photo of a rabbit",
    "a photo of a fox", "a photo of an owl", "a photo of a deer", "a photo of a panda",
])
MAX_STEPS = 1000
MAX_SIZE = 8192

#: widget name -> TrainConfig field (same name unless listed)
CONFIG_WIDGETS = ("epochs", "prompts_per_epoch", "images_per_prompt", "steps", "cfg", "beta",
                  "clip_range", "updates_per_epoch", "learning_rate", "lora_rank", "width", "height",
                  "seed", "negative_prompt", "checkpoint_every", "algorithm")


def parse_prompts(text: Optional[str]) -> List[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    if not text:
        return []
    return [line.strip() for line in str(text).splitlines() if line.strip() and not line.strip().startswith("#")]


def build_config(preset: str, **widgets: Any) -> TrainConfig:
    """The preset's values for everything not on the node, overridden by the widget values
    that are given (None: keep the preset's). Raises ValueError naming every bad value."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: choose one of {', '.join(PRESETS)}")
    overrides = {name: widgets[name] for name in CONFIG_WIDGETS if widgets.get(name) is not None}
    problems = []
    steps = overrides.get("steps")
    if steps is not None and steps > MAX_STEPS:
        problems.append(f"steps={steps}: at most {MAX_STEPS} (the model's training timesteps)")
    for name in ("width", "height"):
        value = overrides.get(name)
        if value is not None and value > MAX_SIZE:
            problems.append(f"{name}={value}: at most {MAX_SIZE}")
    try:
        config = preset_config(preset, **overrides)
    except ValueError as error:
        problems.append(str(error).replace("invalid training configuration:\n  - ", "").replace("\n  - ", "; "))
        config = None
    if problems:
        raise ValueError("; ".join(problems))
    return config


def validate_form(prompts: Optional[str], prompt_file_given: bool, preset: str,
                  lora_name_error: Optional[str], **widgets: Any) -> Optional[str]:
    """The first line of what is wrong with the form, or None when it is fine.

    `prompts` is None when the prompts come through a link (checked again at run time).
    """
    messages = []
    if prompts is not None and not parse_prompts(prompts) and not prompt_file_given:
        messages.append("no prompts: write at least one prompt in 'prompts' (one per line) "
                        "or choose a prompt_file")
    if lora_name_error:
        messages.append(lora_name_error)
    try:
        build_config(preset, **widgets)
    except ValueError as error:
        messages.append(str(error))
    return "; ".join(messages) if messages else None


def config_summary(config: TrainConfig, prompt_count: int) -> Dict[str, Any]:
    """What a job reports about its settings."""
    keys = ("algorithm", "epochs", "prompts_per_epoch", "images_per_prompt", "updates_per_epoch",
            "steps", "cfg", "beta", "clip_range", "learning_rate", "lora_rank", "width", "height", "seed")
    summary = {key: getattr(config, key) for key in keys}
    summary["prompts"] = prompt_count
    return summary
