"""The --out folder of a run: refused places, the lock that keeps a second run out, and the plan
of what this run does there (a new run, a resume, nothing left to do; see runs/run_folder.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List

from ..config import TrainConfig
from .settings import explicit_settings

#: folders that hold no user files; an --out there is a mistake
SYSTEM_FOLDERS = (Path("/proc"), Path("/sys"), Path("/dev"))


def check_out_path(out: Path) -> None:
    """Refuse an --out that can never be a run folder: a file, a folder under a file, a system
    folder (/proc, /sys, /dev) or a place that cannot be written."""
    target = Path(os.path.abspath(out.expanduser()))
    resolved = target.resolve()
    for system in SYSTEM_FOLDERS:
        if resolved == system or system in resolved.parents:
            raise SystemExit(f"error: --out {out} is inside {system}, a system folder that holds no files; "
                             "choose a folder such as runs/my_run")
    if target.exists() and not target.is_dir():
        raise SystemExit(f"error: --out {out} is a file, not a folder; choose a new folder name")
    existing = next(parent for parent in target.parents if parent.exists())
    if not existing.is_dir():
        raise SystemExit(f"error: --out {out} is under {existing}, which is a file, not a folder; choose "
                         "another --out")
    writable = target if target.exists() else existing
    if not os.access(writable, os.W_OK | os.X_OK):
        raise SystemExit(f"error: --out {out}: {writable} is not writable; choose a folder you can write to")


def claim_out_dir(out: Path, resume: bool):
    """The --out folder, created if new and locked for this run (a RunLock to release)."""
    from ..runs.run_lock import FolderInUse, RunLock

    if resume and not out.is_dir():
        raise SystemExit(f"error: --resume: {out} does not exist; run without --resume first")
    out.mkdir(parents=True, exist_ok=True)
    try:
        return RunLock(out).acquire()
    except FolderInUse as error:
        raise SystemExit(f"error: {error}") from None


def plan_out_dir(args, config: TrainConfig, prompts: List[str]):
    """What this run does in its (locked) --out: a ResumePlan; checkpoints are read and
    checked here, before any model loads. See runs/run_folder.py for the folder states."""
    from ..runs import run_folder
    from ..runs.checkpoints import CheckpointError

    contents = run_folder.inspect(args.out)
    info = run_folder.run_info(args.base, args.reward, args.reward_spec, prompts, args.prompts)
    info["eval_prompts_file"] = str(args.eval_prompts_file) if args.eval_prompts_file else None
    try:
        if args.resume:
            plan = run_folder.plan_resume(contents, config, explicit_settings(args), info)
        else:
            note = run_folder.check_new_run(contents)
            plan = run_folder.ResumePlan(config, notes=[note] if note else [])
    except (run_folder.RunFolderError, CheckpointError) as error:
        raise SystemExit(f"error: {error}") from None
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    if plan.checkpoint is None and plan.finished is None:
        run_folder.write_run_record(args.out, plan.config, info)
    return plan
