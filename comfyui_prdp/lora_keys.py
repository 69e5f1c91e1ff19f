"""Name mapping between diffusers module names and kohya LoRA keys (pure functions).

kohya format with diffusers naming, as read by sd-scripts, A1111/Forge, ComfyUI and diffusers'
`load_lora_weights`:

    lora_unet_<module name with '.' replaced by '_'>.lora_down.weight   (peft lora_A)
    lora_unet_<module name with '.' replaced by '_'>.lora_up.weight     (peft lora_B)
    lora_unet_<module name with '.' replaced by '_'>.alpha              (scale = alpha / rank)

Underscores inside module names (`down_blocks`, `to_q`) make the flattening lossy, so the
inverse needs the list of module names the LoRA can apply to.
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

UNET_PREFIX = "lora_unet"
DOWN = "lora_down.weight"
UP = "lora_up.weight"
ALPHA = "alpha"
SUFFIXES = (DOWN, UP, ALPHA)


def kohya_name(module_name: str, prefix: str = UNET_PREFIX) -> str:
    """`down_blocks.1.attn1.to_q` -> `lora_unet_down_blocks_1_attn1_to_q`."""
    if not module_name:
        raise ValueError("an empty module name has no kohya key")
    return f"{prefix}_{module_name.replace('.', '_')}"


def kohya_key(module_name: str, suffix: str, prefix: str = UNET_PREFIX) -> str:
    """The full key of one tensor: `kohya_name(module) + '.' + suffix`."""
    if suffix not in SUFFIXES:
        raise ValueError(f"unknown LoRA tensor suffix {suffix!r}; use one of {', '.join(SUFFIXES)}")
    return f"{kohya_name(module_name, prefix)}.{suffix}"


def split_kohya_key(key: str) -> Tuple[str, str]:
    """`lora_unet_x_to_q.lora_down.weight` -> (`lora_unet_x_to_q`, `lora_down.weight`)."""
    name, dot, suffix = key.partition(".")
    if not dot or suffix not in SUFFIXES:
        raise ValueError(f"{key!r} is not a kohya LoRA key (expected <name>.{{{', '.join(SUFFIXES)}}})")
    return name, suffix


def kohya_lookup(module_names: Iterable[str], prefix: str = UNET_PREFIX) -> Dict[str, str]:
    """kohya name -> module name for the given modules; raises if two modules flatten alike."""
    lookup: Dict[str, str] = {}
    for module_name in module_names:
        name = kohya_name(module_name, prefix)
        if name in lookup and lookup[name] != module_name:
            raise ValueError(f"modules {lookup[name]!r} and {module_name!r} share the kohya name {name!r}")
        lookup[name] = module_name
    return lookup


def group_by_module(state: Dict[str, object], module_names: Iterable[str],
                    prefix: str = UNET_PREFIX) -> Dict[str, Dict[str, object]]:
    """Split a kohya state dict into {module name: {suffix: tensor}}.

    Raises ValueError listing keys that match no known module, and modules whose down or up
    weight is missing, so a LoRA for another model fails loudly instead of loading partly.
    """
    lookup = kohya_lookup(module_names, prefix)
    grouped: Dict[str, Dict[str, object]] = {}
    unknown = []
    for key, value in state.items():
        name, suffix = split_kohya_key(key)
        module_name = lookup.get(name)
        if module_name is None:
            unknown.append(key)
            continue
        grouped.setdefault(module_name, {})[suffix] = value
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(f"{len(unknown)} LoRA key(s) match no adapted module of this model: {shown}")
    incomplete = sorted(m for m, parts in grouped.items() if DOWN not in parts or UP not in parts)
    if incomplete:
        raise ValueError(f"LoRA modules missing lora_down or lora_up weights: {', '.join(incomplete[:5])}")
    return grouped
