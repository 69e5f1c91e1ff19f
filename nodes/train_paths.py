"""Where training reads and writes inside ComfyUI, and the choice lists built from it.

- LoRAs: `models/loras/prdp/<name>.safetensors` (LoraLoader lists them as `prdp/<name>...`);
  an existing file is never replaced, the next free numbered name is used instead.
- Runs (metrics, checkpoints): `output/prdp_runs/<name>[_NNNNN]/`.
- Prompt files: `*.txt`, `*.jsonl`, `*.json`, `*.csv`, `*.tsv` (comfyui_prdp/prompts.py) in ComfyUI's
  input folder (and its `prompts/` subfolder).
Choice lists hold relative names only; they are resolved here and checked to stay inside
their folder.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional

from ..comfyui_prdp.runs import checkpoints
from .common import folder_paths_module

NONE = "none"
LORA_SUBFOLDER = "prdp"
RUNS_FOLDER = "prdp_runs"
PROMPT_SUFFIXES = (".txt", ".jsonl", ".ndjson", ".json", ".csv", ".tsv")   # the prompt file formats
LORA_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")   # used with fullmatch


def check_lora_name(name: str) -> Optional[str]:
    """An error message, or None when the name is usable as a file name."""
    if not isinstance(name, str) or not LORA_NAME_PATTERN.fullmatch(name) or name.endswith(".") or ".." in name:
        return (f"lora_name={name!r}: use letters, digits, '_', '-' or '.' (no folders, at most 100 "
                "characters), e.g. prdp_pickscore")
    return None


def strip_extension(name: str) -> str:
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else name


def _require_folder_paths():
    folder_paths = folder_paths_module()
    if folder_paths is None:
        raise RuntimeError("ComfyUI's folder_paths is not available: this node runs inside ComfyUI")
    return folder_paths


def lora_folder() -> Path:
    folder_paths = _require_folder_paths()
    return Path(folder_paths.get_folder_paths("loras")[0]) / LORA_SUBFOLDER


def runs_folder() -> Path:
    return Path(_require_folder_paths().get_output_directory()) / RUNS_FOLDER


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


# --- resume ---------------------------------------------------------------------------------
def checkpoint_choices() -> List[str]:
    """'none' plus every checkpoint this package wrote under output/prdp_runs, as
    `run/checkpoints/epoch_N`: only folders whose manifest and files verify (a file uploaded
    into a run folder is never listed)."""
    choices = [NONE]
    if folder_paths_module() is None:
        return choices
    root = runs_folder()
    if root.is_dir():
        found = [folder for run in root.iterdir() if run.is_dir() and not run.is_symlink()
                 for folder in checkpoints.list_checkpoints(run / "checkpoints") if _inside(folder, root)]
        choices += sorted(folder.relative_to(root).as_posix() for folder in found)
    return choices


def resolve_checkpoint(choice: str) -> Optional[Path]:
    """The checkpoint folder of a `resume_from` choice, fully verified and read once, so a bad
    one is refused before any model work."""
    if not choice or choice == NONE:
        return None
    root = runs_folder()
    path = root / choice
    parts = Path(choice).parts
    if (not _inside(path, root) or len(parts) != 3 or parts[1] != "checkpoints"
            or not checkpoints.NAME_PATTERN.match(parts[2])):
        raise ValueError(f"resume_from={choice!r} is not a checkpoint in {root}; pick one from the list")
    try:
        checkpoints.read_checkpoint(path)
    except checkpoints.CheckpointError as error:
        raise ValueError(f"resume_from={choice!r}: {error}") from None
    return path


def check_resume_settings(checkpoint: Path, config) -> List[str]:
    """Refuse (ValueError) resuming `checkpoint` with settings that change what is trained
    (steps, images per prompt, algorithm, rank, ...), listing each difference; returns notes for
    the harmless ones (more epochs, batch sizes, precision)."""
    from ..comfyui_prdp.runs import run_folder

    data = checkpoints.read_checkpoint(checkpoint)
    saved = run_folder.config_from_dict(data.config, checkpoint)
    refused, notes = run_folder.setting_differences(saved, config)
    if refused:
        raise ValueError(f"resume_from={checkpoint.parent.parent.name}/{checkpoint.name} was trained with other "
                         f"settings: {'; '.join(refused)}. Set them back to resume, or leave resume_from at "
                         f"{NONE!r} to start a new run")
    return notes


# --- prompt files ---------------------------------------------------------------------------
def prompt_file_choices() -> List[str]:
    choices = [NONE]
    folder_paths = folder_paths_module()
    if folder_paths is None:
        return choices
    root = Path(folder_paths.get_input_directory())
    for folder in (root, root / "prompts"):
        if folder.is_dir():
            choices += sorted(p.relative_to(root).as_posix() for p in folder.iterdir()
                              if p.suffix.lower() in PROMPT_SUFFIXES and p.is_file())
    return choices


def resolve_prompt_file(choice: str) -> Optional[Path]:
    if not choice or choice == NONE:
        return None
    root = Path(_require_folder_paths().get_input_directory())
    path = root / choice
    if not _inside(path, root) or not path.is_file():
        raise ValueError(f"prompt_file={choice!r} is not a text file in {root}; pick one from the list")
    return path


def prompt_file_signature(choice: str) -> str:
    """Changes when the file changes (for IS_CHANGED)."""
    try:
        path = resolve_prompt_file(choice)
    except (ValueError, RuntimeError):
        return choice or ""
    if path is None:
        return ""
    stat = os.stat(path)
    return f"{choice}:{stat.st_size}:{stat.st_mtime_ns}"
