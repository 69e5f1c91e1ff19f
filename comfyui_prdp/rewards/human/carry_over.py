"""A run resumed in a new run folder (ComfyUI's train node starts every run in its own folder)
takes the person's choices with it from the folder of the checkpoint it resumes.

Copied into the new folder, the earlier folder only read:

- the preference record's lines of the epochs the checkpoint holds (epoch <= its finished
  epochs), and the lines of the carried ballot, with the images they name;
- the ballot of the next epoch (the one the resumed run samples first), answered or not, unless
  its time ran out: the resumed run asks it again when it samples the same pixels, or uses its
  answer without asking twice (ballots.BallotBox.open).

Nothing is copied into a folder that already has a record or a ballot of its own.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Dict

from ...lora.files import atomic_write
from ...runs.checkpoints import epoch_of
from .ballots import BallotBox, is_own_file_name, read_preferences

logger = logging.getLogger(__name__)


def carry_over(box: BallotBox, checkpoint: Path) -> Dict[str, int]:
    """Copy the choices of the checkpoint's run folder (checkpoint/../..) that belong to the
    resumed run into `box`'s folder. Returns {"lines": record lines copied, "ballot": 1 when the
    next epoch's ballot was carried, else 0}."""
    previous = Path(checkpoint).parent.parent
    if previous.resolve() == box.run_dir.resolve() or box.pending is not None or box.record_path.exists():
        return {"lines": 0, "ballot": 0}
    finished = epoch_of(checkpoint)
    if finished is None:
        raise ValueError(f"{checkpoint} is not a checkpoint folder (epoch_NNNNN)")
    earlier = BallotBox(previous)
    ballot = earlier.pending
    if ballot is not None and (ballot.epoch != finished + 1 or ballot.closed is not None):
        ballot = None
    lines = [line for line in read_preferences(previous)
             if line["epoch"] <= finished or (ballot is not None and line.get("ballot") == ballot.id)]
    names = {name for line in lines for name in line.get("images") or [] if is_own_file_name(name)}
    if ballot is not None:
        names.update(name for row in ballot.files for name in row)
    for name in sorted(names):
        source = previous / name
        if source.is_file():
            atomic_write(box.run_dir / name, lambda tmp, source=source: shutil.copyfile(source, tmp))
    if lines:
        text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines)
        atomic_write(box.record_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    if ballot is not None:
        box.adopt(ballot)
    logger.info("PRDP: carried %d preference line(s)%s from %s", len(lines),
                f" and the open ballot of epoch {ballot.epoch}" if ballot is not None else "", previous)
    return {"lines": len(lines), "ballot": int(ballot is not None)}
