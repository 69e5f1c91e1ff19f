"""What a command-line output folder allows: a new run, continuing one (--resume), or neither.

A folder is, judged from what a run writes into it:

- new: missing or empty;
- not started: only what a run writes before its first epoch ends (the run record
  config.json, the lock file, an empty metrics.jsonl, a checkpoints/ folder with no
  checkpoint), e.g. after Ctrl-C while the model loads or during the before-training
  evaluation. It is reusable: a new run, or --resume, starts from epoch 0 there;
- resumable: it holds a checkpoint; --resume continues from the latest one, with the run's own
  settings (flags given again must agree; see `setting_differences`);
- finished: the run's final LoRA is there and no checkpoint is ahead of it; --resume says so
  and writes nothing, unless a larger --epochs can continue from a checkpoint.

Anything else (files a run does not write, or trained epochs with no checkpoint) is refused,
so nothing is overwritten.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from . import checkpoints
from ..config import TrainConfig
from ..lora.files import atomic_write
from ..prompts import prompts_sha256
from .run_lock import LOCK_FILE

RUN_RECORD = "config.json"
METRICS = "metrics.jsonl"
RECORD_FORMAT = "comfyui-prdp-run"
RESULT_FILES = frozenset({"reward_curve.png", "before_after.png", "held_out.json", "train_prompts.txt"})
#: settings that may change on resume without changing what is trained
FREE_SETTINGS = frozenset({"epochs", "checkpoint_every", "eval_every", "early_stop_patience"})
#: settings that change only how the work is batched or computed: allowed with a warning
EXECUTION_SETTINGS = frozenset({"sample_batch_size", "train_batch_size", "mixed_precision",
                                "gradient_checkpointing"})


class RunFolderError(ValueError):
    """The folder cannot be used the way asked; the message says why and what to do."""


@dataclass
class FolderContents:
    out: Path
    record: Optional[dict] = None            # the run record (config.json) when it is ours
    checkpoint: Optional[Path] = None        # the latest valid checkpoint
    damaged: Dict[Path, str] = field(default_factory=dict)   # checkpoint folders that fail their checks
    final_loras: List[Tuple[Path, int]] = field(default_factory=list)   # (file, epochs)
    metrics_lines: int = 0
    results: List[str] = field(default_factory=list)  # plots and summaries written after training
    other: List[str] = field(default_factory=list)    # names a run does not write

    @property
    def empty(self) -> bool:
        return not self.out.exists() or all(p.name == LOCK_FILE for p in self.out.iterdir())

    @property
    def not_started(self) -> bool:
        return (self.checkpoint is None and not self.damaged and not self.final_loras
                and self.metrics_lines == 0 and not self.results and not self.other)


@dataclass
class ResumePlan:
    config: TrainConfig
    checkpoint: Optional[checkpoints.CheckpointData] = None   # None: start from epoch 0
    notes: List[str] = field(default_factory=list)
    finished: Optional[str] = None           # set when there is nothing to do


def inspect(out: Path) -> FolderContents:
    """Classify every entry of `out` (see the module docstring)."""
    out = Path(out)
    contents = FolderContents(out)
    if not out.is_dir():
        return contents
    for entry in sorted(out.iterdir()):
        name = entry.name
        if name == LOCK_FILE:
            continue
        if name in RESULT_FILES:
            contents.results.append(name)
        elif name == RUN_RECORD and _read_record(entry) is not None:
            contents.record = _read_record(entry)
        elif name == METRICS and entry.is_file():
            contents.metrics_lines = sum(1 for line in entry.read_text(errors="replace").splitlines() if line.strip())
        elif name == "checkpoints" and entry.is_dir():
            found, contents.damaged = checkpoints.scan_checkpoints(entry)
            contents.checkpoint = found[-1] if found else None
            known = set(found) | set(contents.damaged)
            if any(p not in known and not p.name.startswith(".") for p in entry.iterdir()):
                contents.other.append(name)   # files a run does not write
        elif name.startswith("lora") and name.endswith(".safetensors") and entry.is_file():
            contents.final_loras.append((entry, _lora_epochs(entry)))
        else:
            contents.other.append(name)
    return contents


def check_new_run(contents: FolderContents) -> Optional[str]:
    """None for a new folder; a note for a reusable one; RunFolderError otherwise."""
    if contents.empty:
        return None
    if contents.not_started:
        return f"{contents.out} holds only a run that stopped before training: starting it again"
    hint = (" or pass --resume to continue the run that is there" if contents.checkpoint is not None else "")
    raise RunFolderError(f"{contents.out} already contains files; choose a new --out folder{hint} "
                         "(nothing is overwritten)")


def plan_resume(contents: FolderContents, fresh_config: TrainConfig, explicit: Mapping[str, Any],
                run_info: Mapping[str, Any]) -> ResumePlan:
    """How --resume proceeds in `contents.out`. `fresh_config` is the config without --resume;
    `explicit` the settings given on this command line; `run_info` base, reward and prompts."""
    out = contents.out
    if not out.is_dir():
        raise RunFolderError(f"--resume: {out} does not exist; run without --resume first")
    if contents.not_started:
        return ResumePlan(fresh_config, notes=[f"{out} has no checkpoint yet (the earlier run stopped before "
                                               "training): starting from epoch 0"])
    _check_run_info(contents.record, run_info, out)
    newer_damaged = [(folder, why) for folder, why in sorted(contents.damaged.items())
                     if contents.checkpoint is None
                     or checkpoints.epoch_of(folder) >= checkpoints.epoch_of(contents.checkpoint)]
    if contents.checkpoint is None:
        if newer_damaged:
            raise RunFolderError(f"--resume: no usable checkpoint: {newer_damaged[-1][1]}")
        return _plan_without_checkpoint(contents, explicit)
    data = checkpoints.read_checkpoint(contents.checkpoint)
    saved = config_from_dict(data.config, data.path / checkpoints.STATE_FILE)
    config = _apply(saved, explicit)
    refused, notes = setting_differences(saved, config)
    if refused:
        raise RunFolderError(f"--resume: these settings differ from the run in {out}: {'; '.join(refused)}. "
                             "Leave them out (--resume reuses the run's settings) or start a new --out")
    if config.epochs < data.epoch:
        raise RunFolderError(f"--resume: the checkpoint {data.path.name} has {data.epoch} epochs, more than "
                             f"--epochs {config.epochs}; pass --epochs {data.epoch} or more")
    finished_lora = next((path for path, epochs in contents.final_loras if epochs == data.epoch), None)
    if data.epoch == config.epochs and not data.partial and finished_lora is not None:
        return ResumePlan(config, data, notes, finished=(
            f"{out}: the run already finished {data.epoch} epochs (LoRA: {finished_lora}); nothing to do. "
            "To train longer, pass a larger --epochs with --resume"))
    notes.insert(0, f"resuming {out} from {data.path.name} (epoch {data.epoch} of {config.epochs})")
    notes += [f"skipping {folder.name}: {why}" for folder, why in newer_damaged]
    return ResumePlan(config, data, notes)


def setting_differences(saved: TrainConfig, new: TrainConfig) -> Tuple[List[str], List[str]]:
    """(refused, warnings): one 'name: old -> new' entry per setting that differs."""
    before, after = _comparable(saved), _comparable(new)
    refused, warnings = [], []
    for key in sorted(set(before) | set(after)):
        if before.get(key) == after.get(key):
            continue
        text = f"{key} {before.get(key)!r} -> {after.get(key)!r}"
        if key in FREE_SETTINGS:
            warnings.append(f"{text} (as asked)")
        elif key in EXECUTION_SETTINGS:
            warnings.append(f"{text}: same training, but not bit-identical to an uninterrupted run")
        else:
            refused.append(text)
    return refused, warnings


def config_from_dict(values: Mapping[str, Any], source: Path) -> TrainConfig:
    """The TrainConfig a checkpoint or run record stored (lists back to tuples), validated."""
    defaults = TrainConfig()
    restored = {}
    for key, value in values.items():
        if isinstance(getattr(defaults, key, None), tuple) and isinstance(value, list):
            value = tuple(value)
        restored[key] = value
    try:
        return defaults.replace(**restored).validate()
    except (TypeError, ValueError) as error:
        reason = str(error).replace("\n", " ")
        raise RunFolderError(f"{source}: the stored settings are not usable ({reason}); start a new --out") from None


def write_run_record(out: Path, config: TrainConfig, run_info: Mapping[str, Any]) -> Path:
    """config.json: what the run was started with (kept when a run is resumed)."""
    record = {"format": RECORD_FORMAT, "config": config.to_dict(), **run_info}
    text = json.dumps(record, indent=2, default=str)
    return atomic_write(Path(out) / RUN_RECORD, lambda tmp: Path(tmp).write_text(text))


def run_info(base: Optional[str], reward: str, reward_spec: Optional[str], prompts: Sequence[str],
             prompts_file: Optional[Path]) -> Dict[str, Any]:
    """The parts of a run that are not TrainConfig settings but must match on resume."""
    digest = prompts_sha256(prompts)     # streamed: a large PromptSet is never joined
    return {"base": base or "embedded-tiny-sd", "reward": reward, "reward_spec": reward_spec,
            "prompts": len(prompts), "prompts_sha256": digest,
            "prompts_file": str(prompts_file) if prompts_file else None}


# ----------------------------------------------------------------------------- helpers
def _plan_without_checkpoint(contents: FolderContents, explicit: Mapping[str, Any]) -> ResumePlan:
    out = contents.out
    if contents.final_loras:
        path, epochs = contents.final_loras[-1]
        asked = explicit.get("epochs")
        if asked is not None and asked > epochs:
            raise RunFolderError(f"--resume: {out} finished {epochs} epochs but kept no checkpoint to continue "
                                 "from (it ran with --checkpoint-every 0); start a new --out with "
                                 f"--epochs {asked} and --checkpoint-every N")
        config = config_from_dict((contents.record or {}).get("config", {}), out / RUN_RECORD)
        return ResumePlan(config, finished=f"{out}: the run already finished {epochs} epochs (LoRA: {path}); "
                                           "nothing to do")
    if contents.metrics_lines:
        raise RunFolderError(f"--resume: {out} trained {contents.metrics_lines} epoch(s) but kept no checkpoint "
                             "(pass --checkpoint-every N to keep them); start a new --out")
    found = ", ".join(contents.results + contents.other)
    raise RunFolderError(f"--resume: {out} has no checkpoint to continue from (it holds {found}); choose the "
                         "folder of an earlier run, or a new --out without --resume")


def _check_run_info(record: Optional[dict], info: Mapping[str, Any], out: Path) -> None:
    if record is None:
        return
    problems = []
    flags = {"base": "--base", "reward": "--reward", "reward_spec": "--reward-spec",
             "eval_prompts_file": "--eval-prompts-file"}      # the held-out set decides the training prompts
    for key, flag in flags.items():
        if key in record and record[key] != info.get(key):
            fix = f"pass {flag} {record[key]}" if record[key] is not None else f"leave out {flag}"
            problems.append(f"{key} {record[key]!r} -> {info.get(key)!r} ({fix})")
    if "prompts_sha256" in record and record["prompts_sha256"] != info.get("prompts_sha256"):
        where = record.get("prompts_file") or "the default prompts"
        problems.append(f"prompts differ from the run's ({record.get('prompts')} prompts from {where})")
    if problems:
        raise RunFolderError(f"--resume: this command differs from the run in {out}: {'; '.join(problems)}; "
                             "repeat the original command with --resume, or start a new --out")


def _apply(saved: TrainConfig, explicit: Mapping[str, Any]) -> TrainConfig:
    try:
        return saved.replace(**explicit).validate()
    except ValueError as error:
        raise RunFolderError(str(error).replace("\n", " ")) from None


def _comparable(config: TrainConfig) -> Dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _read_record(path: Path) -> Optional[dict]:
    """The run record when `path` is one a run wrote, else None."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if isinstance(record, dict) and isinstance(record.get("config"), dict) and "base" in record:
        return record
    return None


def _lora_epochs(path: Path) -> int:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return int((handle.metadata() or {}).get("epochs", -1))
    except (SafetensorError, OSError, ValueError):   # unreadable: not this run's final LoRA
        return -1
