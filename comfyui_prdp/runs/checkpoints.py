"""Trainer checkpoints that cannot carry code: tensors in safetensors, the rest in JSON.

A checkpoint is a folder `checkpoints/epoch_NNNNN[_stopped]/` holding:

- `lora.safetensors`: the LoRA (kohya keys), loadable by any LoRA loader;
- `optimizer.safetensors`: the AdamW state per parameter (`state.<index>.<name>`) and the
  torch CPU RNG state (`rng.torch`, uint8);
- `trainer_state.json`: epoch, partial, metrics, config, optimizer hyperparameters and
  `extra` (JSON state a trainer adds, e.g. a per-prompt reward buffer);
- `prdp_checkpoint.json`: the manifest, written last: format, version, and the size and
  sha256 of each file above.

Only folders with a valid manifest are checkpoints: a file that merely lands in a run folder
(an upload, a copy) is never listed or read. Nothing is ever unpickled; an old pickled
`trainer_state.pt` is refused. A manifest proves only that the files are intact, not who
wrote them, so everything read is also validated (types, finite values, shapes).
Every problem raises `CheckpointError` with one line naming the file, the problem and the fix.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from safetensors.torch import save_file

from ..lora.files import save_lora
from .checkpoint_files import (FORMAT, OPTIMIZER_KEYS, CheckpointError, check_file, file_sha256, group_optimizer_state,
                               is_count, json_safe, non_finite_paths, parse_state, parse_tensors, read_json,
                               require_finite, verified_bytes)

MANIFEST = "prdp_checkpoint.json"
LORA_FILE = "lora.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
LEGACY_PICKLE = "trainer_state.pt"
VERSION = 1
DATA_FILES = (LORA_FILE, OPTIMIZER_FILE, STATE_FILE)
RNG_KEY = "rng.torch"
NAME_PATTERN = re.compile(r"^epoch_(\d{5,})(_stopped)?(_\d{5})?\Z")


@dataclass
class CheckpointData:
    """Everything read from a checkpoint folder, validated except against a model."""
    path: Path
    epoch: int
    partial: bool
    metrics: List[dict]
    config: Dict[str, Any]
    lora: Dict[str, torch.Tensor]
    optimizer_state: Dict[int, Dict[str, torch.Tensor]]
    rng: Optional[torch.Tensor] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerSnapshot:
    """What a checkpoint stores from a trainer at one moment (tensors on the CPU)."""
    epoch: int
    lora: Dict[str, torch.Tensor]
    optimizer: Dict[str, Any]               # an optimizer.state_dict()
    extra: Dict[str, Any]
    rng: torch.Tensor

    @classmethod
    def take(cls, epoch: int, lora: Mapping[str, torch.Tensor], optimizer_state: Mapping[str, Any],
             extra: Mapping[str, Any]) -> "TrainerSnapshot":
        """A copy that later training does not change."""
        def copy(value):
            return value.detach().to("cpu", copy=True) if torch.is_tensor(value) else value
        optimizer = {"state": {i: {k: copy(v) for k, v in s.items()} for i, s in optimizer_state["state"].items()},
                     "param_groups": [dict(g) for g in optimizer_state["param_groups"]]}
        return cls(epoch, {k: copy(v) for k, v in lora.items()}, optimizer, json_safe(dict(extra)),
                   torch.get_rng_state())


# ----------------------------------------------------------------------------- writing
def write_checkpoint(root: Path, epoch: int, partial: bool, lora: Mapping[str, torch.Tensor],
                     lora_metadata: Mapping[str, str], optimizer_state_dict: Mapping[str, Any],
                     metrics: Sequence[dict], config: Mapping[str, Any],
                     extra: Optional[Mapping[str, Any]] = None,
                     rng: Optional[torch.Tensor] = None) -> Path:
    """Write a checkpoint under `root` atomically (staging folder, manifest last, rename)
    and return its folder. An existing checkpoint is never replaced."""
    tensors = optimizer_tensors(optimizer_state_dict)
    if rng is not None:
        tensors[RNG_KEY] = rng.detach().to("cpu", torch.uint8).contiguous()
    require_finite(lora, LORA_FILE)
    require_finite(tensors, OPTIMIZER_FILE)
    state = {"format": FORMAT, "version": VERSION, "epoch": int(epoch), "partial": bool(partial),
             "metrics": list(metrics), "config": json_safe(config),
             "optimizer_groups": [json_safe({k: v for k, v in g.items() if k != "params"})
                                  for g in optimizer_state_dict.get("param_groups", [])],
             "extra": json_safe(dict(extra or {}))}
    bad = non_finite_paths({"config": state["config"], "extra": state["extra"]})
    if bad:
        raise CheckpointError(f"not writing a checkpoint: non-finite value at {bad[0]}")
    text = json.dumps(state, indent=1)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"epoch_{int(epoch):05d}" + ("_stopped" if partial else "")
    staging = root / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"   # hidden: never listed
    staging.mkdir()
    try:
        save_lora(staging / LORA_FILE, lora, lora_metadata)
        save_file(tensors, str(staging / OPTIMIZER_FILE), metadata={"format": FORMAT})
        (staging / STATE_FILE).write_text(text, encoding="utf-8")
        manifest = {"format": FORMAT, "version": VERSION, "epoch": int(epoch), "partial": bool(partial),
                    "files": {f: {"size": (staging / f).stat().st_size, "sha256": file_sha256(staging / f)}
                              for f in DATA_FILES}}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        return _rename_to_free_name(staging, root, name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def optimizer_tensors(optimizer_state_dict: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The per-parameter optimizer state as flat safetensors entries `state.<index>.<name>`."""
    tensors = {}
    for index, per_param in optimizer_state_dict.get("state", {}).items():
        for name, value in per_param.items():
            if name not in OPTIMIZER_KEYS:
                raise CheckpointError(f"not writing a checkpoint: unsupported optimizer state {name!r} "
                                      "(only AdamW's step/exp_avg/exp_avg_sq are stored)")
            value = value if torch.is_tensor(value) else torch.tensor(float(value))
            tensors[f"state.{int(index)}.{name}"] = value.detach().cpu().contiguous()
    return tensors


def _rename_to_free_name(staging: Path, root: Path, name: str) -> Path:
    """Rename the staging folder to `name` (or `name_00001`, ...): never onto an existing one."""
    counter = 0
    while True:
        target = root / (name if counter == 0 else f"{name}_{counter:05d}")
        if not target.exists():
            try:
                os.rename(staging, target)   # fails if target appeared meanwhile and is not empty
                return target
            except OSError:
                if not target.exists():
                    raise
        counter += 1


# ----------------------------------------------------------------------------- reading
def read_checkpoint(path: Path) -> CheckpointData:
    """Verify and read a checkpoint folder (or a run folder: its latest checkpoint). Each file
    is read once; its bytes are checked against the manifest and parsed from that same copy."""
    folder = resolve_checkpoint_folder(Path(path))
    manifest = verify_manifest(folder, check_hashes=False)
    blobs = {name: verified_bytes(folder / name, manifest["files"][name]) for name in DATA_FILES}
    state = parse_state(blobs[STATE_FILE], folder / STATE_FILE)
    if state["epoch"] != manifest["epoch"]:
        raise CheckpointError(f"{folder / STATE_FILE}: epoch {state['epoch']} differs from the manifest's "
                              f"{manifest['epoch']}; the checkpoint is inconsistent, use another one")
    lora = parse_tensors(blobs[LORA_FILE], folder / LORA_FILE)
    tensors = parse_tensors(blobs[OPTIMIZER_FILE], folder / OPTIMIZER_FILE)
    rng = tensors.pop(RNG_KEY, None)
    if rng is not None and (rng.dtype != torch.uint8 or rng.dim() != 1
                            or rng.numel() != torch.get_rng_state().numel()):
        raise CheckpointError(f"{folder / OPTIMIZER_FILE}: {RNG_KEY} is not a torch RNG state "
                              f"(dtype {rng.dtype}, shape {tuple(rng.shape)}); the checkpoint is damaged")
    return CheckpointData(path=folder, epoch=state["epoch"], partial=state["partial"], metrics=state["metrics"],
                          config=state["config"], lora=lora,
                          optimizer_state=group_optimizer_state(tensors, folder / OPTIMIZER_FILE),
                          rng=rng, extra=state["extra"])


def resolve_checkpoint_folder(path: Path) -> Path:
    """`path` itself when it is a checkpoint folder, else the latest checkpoint of the run `path`."""
    if (path / MANIFEST).exists() or (path / LEGACY_PICKLE).exists():
        return path
    if (path / "checkpoints").is_dir():
        return latest_checkpoint(path)
    raise CheckpointError(f"{path} is not a PRDP checkpoint (no {MANIFEST}); pass a checkpoints/epoch_NNNNN "
                          "folder or the run's output folder")


def latest_checkpoint(out_dir: Path) -> Path:
    """The newest checkpoint of a run folder (highest epoch, a finished one before a stopped
    one, then the latest written); only folders with a valid manifest count."""
    root = Path(out_dir) / "checkpoints"
    found = list_checkpoints(root)
    if not found:
        legacy = sorted(p.name for p in root.glob("epoch_*") if (p / LEGACY_PICKLE).exists())
        hint = (f" ({', '.join(legacy)} use the old pickled format, which is not loaded because a pickle can "
                "run code: start a new run)" if legacy else "")
        raise CheckpointError(f"no checkpoint in {root}{hint}")
    return found[-1]


def list_checkpoints(root: Path) -> List[Path]:
    """Checkpoint folders directly under `root` with a valid manifest and intact files,
    oldest first (the order latest_checkpoint uses)."""
    return scan_checkpoints(root)[0]


def epoch_of(folder: Path) -> Optional[int]:
    """The finished epochs a checkpoint folder holds, from its name (epoch_NNNNN[_stopped]);
    None for a folder not named like a checkpoint."""
    match = NAME_PATTERN.match(Path(folder).name)
    return int(match.group(1)) if match else None


def scan_checkpoints(root: Path) -> Tuple[List[Path], Dict[Path, str]]:
    """(valid checkpoint folders oldest first, {folder named like a checkpoint: why it is not one})."""
    root = Path(root)
    if not root.is_dir():
        return [], {}
    found, problems = [], {}
    for folder in root.iterdir():
        match = NAME_PATTERN.match(folder.name)
        if not match:
            continue
        try:
            verify_manifest(folder, check_hashes=True)
        except CheckpointError as error:
            problems[folder] = str(error)
            continue
        found.append((int(match.group(1)), match.group(2) is None, folder.name, folder))
    return [entry[-1] for entry in sorted(found)], problems


def is_checkpoint(folder: Path) -> bool:
    """True when `folder` holds a checkpoint this package wrote, files intact (cached hashes)."""
    try:
        verify_manifest(Path(folder), check_hashes=True)
        return True
    except CheckpointError:
        return False


def verify_manifest(folder: Path, check_hashes: bool = True) -> dict:
    """The parsed manifest of `folder`; raises CheckpointError unless every file it names is
    a regular file with the recorded size and sha256."""
    manifest_path = folder / MANIFEST
    if folder.is_symlink() or not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder; pass a checkpoints/epoch_NNNNN folder")
    if not manifest_path.exists():
        if (folder / LEGACY_PICKLE).exists():
            raise CheckpointError(f"{folder / LEGACY_PICKLE} is a pickled trainer state (older comfyui-prdp or "
                                  "not written by it); it is not loaded because a pickle can run code: "
                                  "start a new run")
        raise CheckpointError(f"{folder} is not a PRDP checkpoint (no {MANIFEST}); pick a checkpoint this "
                              "package wrote")
    if not stat.S_ISREG(os.lstat(manifest_path).st_mode):
        raise CheckpointError(f"{manifest_path} is not a regular file; pick a checkpoint this package wrote")
    manifest = read_json(manifest_path, limit=1 << 16)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(files, dict)
            or set(files) != set(DATA_FILES) or not is_count(manifest.get("epoch"))
            or not isinstance(manifest.get("partial"), bool)):
        raise CheckpointError(f"{manifest_path} is not a comfyui-prdp checkpoint manifest; "
                              "pick a checkpoint this package wrote")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{manifest_path}: checkpoint format version {manifest.get('version')!r} is not "
                              f"supported (this version reads {VERSION}); use the comfyui-prdp that wrote it")
    for name in DATA_FILES:
        entry = files[name]
        if (not isinstance(entry, dict) or not is_count(entry.get("size"))
                or not isinstance(entry.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise CheckpointError(f"{manifest_path}: the entry for {name} is malformed; the checkpoint is damaged")
        check_file(folder / name, entry, check_hashes)
    return manifest


# ----------------------------------------------------------------------------- matching a model
def check_fits(data: CheckpointData, lora_reference: Mapping[str, torch.Tensor],
               parameters: Sequence[torch.Tensor]) -> None:
    """Raise CheckpointError unless the checkpoint's LoRA and optimizer state fit this model."""
    lora_file = data.path / LORA_FILE
    missing = sorted(set(lora_reference) - set(data.lora))
    unexpected = sorted(set(data.lora) - set(lora_reference))
    if missing or unexpected:
        raise CheckpointError(f"{lora_file} does not match this model's LoRA ({len(missing)} keys missing, e.g. "
                              f"{(missing or unexpected)[0]!r}; {len(unexpected)} unexpected): resume with the same "
                              "model and LoRA targets")
    for key, reference in lora_reference.items():
        if tuple(data.lora[key].shape) != tuple(reference.shape):
            raise CheckpointError(f"{lora_file}: {key} has shape {tuple(data.lora[key].shape)}, this model's LoRA "
                                  f"{tuple(reference.shape)}: resume with the same model and lora_rank")
    optimizer_file = data.path / OPTIMIZER_FILE
    for index, per_param in data.optimizer_state.items():
        if index >= len(parameters):
            raise CheckpointError(f"{optimizer_file}: optimizer state for parameter {index}, but this LoRA has "
                                  f"{len(parameters)}: resume with the same model and LoRA settings")
        shape = tuple(parameters[index].shape)
        for name, value in per_param.items():
            if name != "step" and tuple(value.shape) != shape:
                raise CheckpointError(f"{optimizer_file}: state.{index}.{name} has shape {tuple(value.shape)}, the "
                                      f"parameter {shape}: resume with the same model and lora_rank")


def optimizer_state_dict(data: CheckpointData, optimizer: torch.optim.Optimizer) -> dict:
    """A state dict for `optimizer.load_state_dict`: the stored per-parameter state with this
    run's own hyperparameter groups (those come from the config, never from the file)."""
    return {"state": {i: dict(s) for i, s in data.optimizer_state.items()},
            "param_groups": optimizer.state_dict()["param_groups"]}


def align_optimizer_state(optimizer: torch.optim.Optimizer) -> int:
    """Move each parameter's optimizer state to the parameter's device, and its floating state
    to the parameter's dtype; returns how many tensors moved. `load_state_dict` places the state
    where the parameters are at load time, but a resumed LoRA starts on the CPU and moves with
    the model's first load, so call this before each step. Tensors already in place are not
    copied and no value is read: no device sync. `step` stays where the optimizer keeps it (on
    the CPU unless the group is capturable or fused, as torch's own loading does)."""
    moved = 0
    for group in optimizer.param_groups:
        step_on_device = bool(group.get("capturable") or group.get("fused"))
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for name, value in state.items():
                if not isinstance(value, torch.Tensor) or (name == "step" and not step_on_device):
                    continue
                dtype = param.dtype if value.is_floating_point() and name != "step" else value.dtype
                if value.device != param.device or value.dtype != dtype:
                    state[name] = value.to(device=param.device, dtype=dtype)
                    moved += 1
    return moved
