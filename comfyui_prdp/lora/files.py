"""LoRA files: atomic, never-overwriting safetensors writes with metadata, and reading back.

The state dict is kohya format with diffusers module naming (what sd-scripts, A1111/Forge,
ComfyUI's LoraLoader and diffusers' `load_lora_weights` all read); backends produce it.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_NAME = "comfyui-prdp"


def atomic_write(path: Path, write) -> Path:
    """Call write(tmp_path) then move the temp file onto `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(tmp_name)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path


def unique_path(path: Path) -> Path:
    """`path` if free, else the next free `stem_00001.ext`, `stem_00002.ext`, ..."""
    path = Path(path)
    if not path.exists():
        return path
    stem = re.sub(r"_\d{5}$", "", path.stem)
    counter = 1
    while True:
        candidate = path.with_name(f"{stem}_{counter:05d}{path.suffix}")
        if not candidate.exists():
            return candidate
        counter += 1


def check_finite(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Raise ValueError naming the tensors with NaN or inf values (a diverged training)."""
    bad = [key for key, value in tensors.items() if not bool(torch.isfinite(value).all())]
    if bad:
        raise ValueError(f"refusing to write {Path(path).name}: {len(bad)} of {len(tensors)} LoRA tensors hold NaN "
                         f"or inf values (first: {bad[0]}); training diverged, so lower the learning rate or "
                         "resume from the last good checkpoint")


def save_lora(path: Path, state_dict: Mapping[str, torch.Tensor],
              metadata: Mapping[str, str] | None = None, *, overwrite: bool = False) -> Path:
    """Write a LoRA as safetensors atomically. Refuses to replace an existing file unless
    `overwrite` (used only for the trainer's own rolling files), and refuses non-finite values
    (nothing is written then)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name (unique_path() "
                              "gives the next free numbered one)")
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in state_dict.items()}
    check_finite(tensors, path)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_lora(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(state dict, metadata) of a LoRA safetensors file, with a clear error when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors LoRA file ({error}); "
                         "re-export it or pick another file") from error
    return state, metadata


def lora_metadata(config, backend, reward_name: str, epochs: int, prompt_count: int) -> Dict[str, str]:
    """Metadata strings written into every LoRA file (kohya-style `ss_` keys where they exist)."""
    info = backend.lora_info() if backend is not None else {}
    family = info.get("family")            # a model_families.ModelFamily where the backend knows it
    family_keys = family.metadata() if family is not None else {"ss_base_model_version": "sd_v1"}
    return {
        "format": FORMAT_NAME,
        "algorithm": config.algorithm,
        "reward": reward_name,
        "base_model": getattr(backend, "model_name", "unknown"),
        **({"base_family": family.name} if family is not None else {}),
        **family_keys,
        "ss_resolution": f"({config.width}, {config.height})",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.lora_rank),
        # the alpha the file's tensors are at (flow transformers' files fold alpha / rank into lora_up)
        "ss_network_alpha": str(info.get("file_alpha", config.effective_lora_alpha)),
        **({"lora_key_format": str(info["key_format"])} if "key_format" in info else {}),
        "epochs": str(epochs),
        "prompts_count": str(prompt_count),
        "lora_targets": json.dumps(list(info.get("targets", config.lora_targets))),
        "hyperparameters": json.dumps(config.to_dict(), default=str),
    }
