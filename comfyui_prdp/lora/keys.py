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
    return _checked_groups(grouped, unknown, DOWN, UP)


# --- diffusers/peft naming (flow transformers: SD3, Flux) --------------------------------
#     transformer.<module name>.lora_A.weight   (down)
#     transformer.<module name>.lora_B.weight   (up; no alpha key, so the scale is 1)
# the format diffusers' `load_lora_weights` reads for SD3 / Flux and ComfyUI maps for both
# (its `transformer.` keys in comfy/lora.py's model_lora_keys_unet). Module names keep their dots,
# so the mapping is lossless.
TRANSFORMER_PREFIX = "transformer"
PEFT_DOWN = "lora_A.weight"
PEFT_UP = "lora_B.weight"


def peft_key(module_name: str, suffix: str, prefix: str = TRANSFORMER_PREFIX) -> str:
    """`transformer_blocks.0.attn.to_q`, `lora_A.weight` -> `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`."""
    if not module_name:
        raise ValueError("an empty module name has no LoRA key")
    if suffix not in (PEFT_DOWN, PEFT_UP):
        raise ValueError(f"unknown peft LoRA suffix {suffix!r}; use {PEFT_DOWN} or {PEFT_UP}")
    return f"{prefix}.{module_name}.{suffix}"


def group_peft_by_module(state: Dict[str, object], module_names: Iterable[str],
                         prefix: str = TRANSFORMER_PREFIX) -> Dict[str, Dict[str, object]]:
    """Split a diffusers/peft LoRA state dict into {module name: {lora_A.weight / lora_B.weight: tensor}}.
    Raises ValueError listing keys that name no known module and modules lacking A or B."""
    known = set(module_names)
    grouped: Dict[str, Dict[str, object]] = {}
    unknown = []
    for key, value in state.items():
        module_name, suffix = None, None
        for candidate in (PEFT_DOWN, PEFT_UP):
            if key.startswith(prefix + ".") and key.endswith("." + candidate):
                module_name, suffix = key[len(prefix) + 1:-len(candidate) - 1], candidate
        if module_name not in known:
            unknown.append(key)
            continue
        grouped.setdefault(module_name, {})[suffix] = value
    return _checked_groups(grouped, unknown, PEFT_DOWN, PEFT_UP)


def _checked_groups(grouped: Dict[str, Dict[str, object]], unknown: list, down: str, up: str,
                    ) -> Dict[str, Dict[str, object]]:
    """`grouped` once no key was left unknown and every module has both its `down` and `up`."""
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(f"{len(unknown)} LoRA key(s) match no adapted module of this model: {shown}")
    incomplete = sorted(m for m, parts in grouped.items() if down not in parts or up not in parts)
    if incomplete:
        raise ValueError(f"LoRA modules missing {down.split('.')[0]} or {up.split('.')[0]} weights: "
                         f"{', '.join(incomplete[:5])}")
    return grouped


def require_every_module(grouped: Dict[str, Dict[str, object]], module_names: Iterable[str],
                         ) -> Dict[str, Dict[str, object]]:
    """`grouped` once it has every one of `module_names` (a LoRA made with other lora_targets lacks some)."""
    missing = sorted(set(module_names) - set(grouped))
    if missing:
        raise ValueError(f"the LoRA lacks {len(missing)} of this model's adapted modules "
                         f"(e.g. {missing[0]}): it was made with other lora_targets")
    return grouped
