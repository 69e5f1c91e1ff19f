"""The checkpoint's files read safely: size and sha256 checks (hashes cached per file state),
bounded JSON, safetensors without pickles, the trainer state's and optimizer state's shapes, and
finite values. Every problem is a CheckpointError naming the file, the problem and the fix."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Dict, List, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

FORMAT = "comfyui-prdp-checkpoint"
OPTIMIZER_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})
REQUIRED_OPTIMIZER_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})
MAX_JSON_BYTES = 256 * 2 ** 20
STATE_KEY = re.compile(r"^state\.(\d+)\.([a-z_]+)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, foreign or does not fit this run."""


def check_file(path: Path, entry: dict, check_hash: bool) -> None:
    try:
        info = os.lstat(path)
    except OSError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, use another one") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is not a regular file; the checkpoint is damaged, use another one")
    if info.st_size != entry["size"]:
        raise CheckpointError(f"{path} has {info.st_size} bytes, the manifest says {entry['size']}: the file "
                              "is truncated or changed; use another checkpoint")
    if check_hash and cached_sha256(path, info) != entry["sha256"]:
        raise CheckpointError(f"{path} does not match the sha256 in its manifest: the file is damaged or "
                              "changed; use another checkpoint")


_HASH_CACHE: Dict[tuple, str] = {}


def cached_sha256(path: Path, info: os.stat_result) -> str:
    """sha256 of a file, remembered per (path, inode, size, mtime) so listings stay cheap."""
    key = (str(path), info.st_ino, info.st_size, info.st_mtime_ns)
    digest = _HASH_CACHE.get(key)
    if digest is None:
        digest = file_sha256(path)
        if len(_HASH_CACHE) > 4096:
            _HASH_CACHE.clear()
        _HASH_CACHE[key] = digest
    return digest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_bytes(path: Path, entry: dict) -> bytes:
    check_file(path, entry, check_hash=False)
    try:
        with open(path, "rb") as handle:
            data = handle.read(entry["size"] + 1)
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read ({error.strerror}); use another checkpoint") from None
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{path} does not match the size and sha256 in its manifest: the file is "
                              "damaged or changed; use another checkpoint")
    return data


def parse_json(data: bytes, path: Path, limit: int = MAX_JSON_BYTES):
    if len(data) > limit:
        raise CheckpointError(f"{path} is {len(data)} bytes, more than a checkpoint file can be ({limit}); "
                              "use another checkpoint")
    if not data.strip():
        raise CheckpointError(f"{path} is empty; the checkpoint is damaged, use another one")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); the checkpoint is damaged, "
                              "use another one") from None


def read_json(path: Path, limit: int):
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read ({error.strerror}); use another checkpoint") from None
    return parse_json(data, path, limit)


def parse_state(data: bytes, path: Path) -> dict:
    state = parse_json(data, path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a comfyui-prdp trainer state; use a checkpoint this package wrote")
    problems = []
    if not is_count(state.get("epoch")):
        problems.append(f"epoch {state.get('epoch')!r} is not an integer >= 0")
    if not isinstance(state.get("partial"), bool):
        problems.append("partial is not true/false")
    metrics = state.get("metrics")
    if not isinstance(metrics, list) or not all(isinstance(m, dict) for m in metrics):
        problems.append("metrics is not a list of objects")
    if not isinstance(state.get("config"), dict):
        problems.append("config is not an object")
    if not isinstance(state.get("extra", {}), dict):
        problems.append("extra is not an object")
    if not problems:
        bad = non_finite_paths({"config": state["config"], "extra": state.get("extra", {})})
        if bad:
            problems.append(f"{bad[0]} is not a finite number")
    if problems:
        raise CheckpointError(f"{path}: {problems[0]}; the checkpoint is damaged, use another one")
    state.setdefault("extra", {})
    return state


def parse_tensors(data: bytes, path: Path) -> Dict[str, torch.Tensor]:
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(error).splitlines()[0]}); "
                              "the checkpoint is damaged, use another one") from None
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: {key} holds non-finite values (NaN or inf); use an earlier checkpoint")
    return tensors


def group_optimizer_state(tensors: Mapping[str, torch.Tensor], path: Path) -> Dict[int, Dict[str, torch.Tensor]]:
    grouped: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = STATE_KEY.match(key)
        if not match or match.group(2) not in OPTIMIZER_KEYS or not value.is_floating_point():
            raise CheckpointError(f"{path}: unexpected entry {key!r} ({value.dtype}); only AdamW state "
                                  "(state.<i>.step/exp_avg/exp_avg_sq) belongs there; the checkpoint is damaged")
        grouped.setdefault(int(match.group(1)), {})[match.group(2)] = value
    for index, per_param in grouped.items():
        missing = REQUIRED_OPTIMIZER_KEYS - set(per_param)
        step = per_param.get("step")
        if missing:
            raise CheckpointError(f"{path}: parameter {index} lacks {', '.join(sorted(missing))}; "
                                  "the checkpoint is damaged, use another one")
        if step.numel() != 1 or step.item() < 0:
            raise CheckpointError(f"{path}: state.{index}.step is not a single count >= 0; the checkpoint is damaged")
    return grouped


def require_finite(tensors: Mapping[str, torch.Tensor], file: str) -> None:
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"not writing a checkpoint: {file} entry {key} holds NaN or inf "
                                  "(training diverged: lower the learning rate); the last good checkpoint is kept")


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def json_safe(value):
    """JSON-ready copy: tuples become lists; anything not JSON-serialisable raises."""
    return json.loads(json.dumps(value))


def non_finite_paths(value, prefix: str = "") -> List[str]:
    if isinstance(value, float):
        return [] if math.isfinite(value) else [prefix or "value"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite_paths(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in non_finite_paths(v, f"{prefix}[{i}]")]
    return []
