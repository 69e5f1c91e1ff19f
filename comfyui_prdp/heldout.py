"""Held-out evaluation during training: fixed unseen (prompt, seed) pairs scored every
`eval_every` epochs, a `best/` checkpoint by held-out reward, and an optional early stop.

The pairs are the prompts of an evaluation file (its first `eval_prompts`; 0: all), or
`eval_prompts` prompts (0: DEFAULT_SPLIT) split off the training set (drawn from the run's seed,
so a resumed run splits the same way), each sampled `eval_seeds` times, every image with its own
seed (evaluation.distinct_seed_rows from FIRST_EVAL_SEED); an image depends only on its pair and
the LoRA, so every evaluation of a run scores the same pairs. No two images share a seed (images
sharing one start from the same noise and are near-duplicates where a model barely reads its
prompt), so the held-out mean is over n = prompts x eval_seeds independent images, and the
standard error reported with it (eval/n, eval/reward_std) counts them honestly.

Early stop (the reward-hacking signal): an evaluation *diverges* when its held-out reward is
below the best held-out reward so far while the training reward (mean over the epochs since the
previous evaluation) is above the training reward at the best evaluation. After
`early_stop_patience` diverging evaluations in a row the run stops (0: never).

`best/` holds one checkpoint, `best/epoch_NNNNN/` (the format of runs/checkpoints.py, written
atomically; its `lora.safetensors` is the best LoRA), and `best/best.json` naming it. A new best
is written before the previous one is removed, and only folders that verify as checkpoints this
package wrote are ever removed, so a crash leaves at least one best and files a user put in
`best/` stay. A best whose recorded held-out reward is above the new one is never removed.

On resume, `best/` may be ahead of the checkpoint resumed from (a best written after the last
periodic checkpoint): `adopt_saved_best` then takes best.json's record as the best so far, so a
later, worse evaluation does not replace it.
"""
from __future__ import annotations

import itertools
import json
import math
import shutil
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from .runs import checkpoints
from .config import TrainConfig
from .lora.files import atomic_write
from .prompts import PromptSet



class MonitoredRun(Protocol):
    """What the monitor reads of the run it evaluates (the Trainer is one): the model, the reward
    and the settings, the progress callback, and what a best/ checkpoint holds."""
    config: TrainConfig
    backend: Any
    reward: Any
    callback: Callable[[dict], None]
    epoch: int
    out_dir: Optional[Path]
    optimizer: Any
    metrics: List[dict]

    def lora_file_metadata(self) -> Dict[str, str]: ...

    def extra_state(self) -> dict: ...


FIRST_EVAL_SEED = 1000
#: held-out prompts split off the training set when eval_prompts is 0
DEFAULT_SPLIT = 4
BEST_FOLDER = "best"
BEST_RECORD = "best.json"
#: generator stream of the split (other streams of the seed belong to the trainer)
SPLIT_STREAM = 77


@dataclass
class HeldOutSet:
    """The fixed (prompt, seed) pairs: `per_prompt` images of every prompt, each with its own seed."""
    prompts: List[str]
    per_prompt: int
    first_seed: int = FIRST_EVAL_SEED

    @property
    def pairs(self) -> int:
        return len(self.prompts) * self.per_prompt

    def rows(self) -> Tuple[List[str], List[int]]:
        """(row prompts, row seeds), prompt-major; no seed repeats."""
        from .evaluation import distinct_seed_rows
        return distinct_seed_rows(self.prompts, self.per_prompt, self.first_seed)


def held_out_split(prompts: Sequence[str], config: TrainConfig,
                   eval_file_prompts: Optional[Sequence[str]] = None) -> Tuple[Sequence[str], Optional[HeldOutSet]]:
    """(training prompts, held-out set or None when config.eval_every is 0).

    With `eval_file_prompts` the first config.eval_prompts of them (all when 0) are held out and
    the training prompts are kept whole; else config.eval_prompts prompts are split off
    `prompts` (a PromptSet stays a lazy PromptSet). ValueError when nothing would be left."""
    if not config.eval_every:
        return prompts, None
    per_prompt = config.eval_seeds
    if eval_file_prompts is not None:
        chosen = list(itertools.islice(eval_file_prompts, config.eval_prompts or None))
        if not chosen:
            raise ValueError("the evaluation prompt file has no prompts; give one prompt per line")
        return prompts, HeldOutSet(chosen, per_prompt)
    count = config.eval_prompts or min(DEFAULT_SPLIT, len(prompts) - 1)
    if count < 1 or count >= len(prompts):
        raise ValueError(f"eval_prompts={count}: held-out prompts are split off the {len(prompts)} training "
                         f"prompt(s), so give 1 to {len(prompts) - 1} (or an evaluation prompt file)")
    generator = torch.Generator().manual_seed((config.seed * 1_000_003 + SPLIT_STREAM) % (2 ** 63))
    held = torch.randperm(len(prompts), generator=generator)[:count]
    held_sorted = sorted(held.tolist())
    kept = array("q", _complement(len(prompts), held_sorted))
    held_prompts = [prompts[i] for i in held_sorted]
    if isinstance(prompts, PromptSet):
        return prompts.subset(kept), HeldOutSet(held_prompts, per_prompt)
    return [prompts[i] for i in kept], HeldOutSet(held_prompts, per_prompt)


def _complement(n: int, held_sorted: List[int]):
    """Indices 0..n-1 not in `held_sorted`, without building a set of n numbers."""
    held_iter = iter(held_sorted)
    next_held = next(held_iter, None)
    for index in range(n):
        if index == next_held:
            next_held = next(held_iter, None)
        else:
            yield index


class HeldOutMonitor:
    """Evaluates a Trainer on a HeldOutSet, keeps `best/` and decides the early stop."""

    def __init__(self, held_out: HeldOutSet, config: TrainConfig):
        if not held_out.prompts or held_out.per_prompt < 1:
            raise ValueError("the held-out set is empty: give at least one prompt and one seed")
        self.held_out = held_out
        self.every = config.eval_every
        self.patience = config.early_stop_patience
        self.evaluations: List[Dict[str, float]] = []   # {"epoch", "eval", "train"} each
        self.best: Optional[Dict[str, float]] = None
        self.strikes = 0
        self.stopped_early = False

    # --- when and what ----------------------------------------------------------------
    def due(self, epoch: int, last_epoch: int) -> bool:
        """Evaluate after epoch `epoch` (1-based)? Every `every` epochs and after the last."""
        return epoch % self.every == 0 or epoch == last_epoch

    def evaluate(self, trainer: MonitoredRun) -> Tuple[float, float, torch.Tensor]:
        """(mean, std, rewards [pairs]) of the held-out pairs with the trainer's current LoRA; its
        progress goes to the trainer's callback as phase events (the CLI bar, a node's dashboard)."""
        from .evaluation import score_rows
        from .progress import PhaseProgress

        row_prompts, row_seeds = self.held_out.rows()
        config = trainer.config
        batches = math.ceil(len(row_seeds) / config.sample_batch_size)
        progress = PhaseProgress(f"held-out evaluation ({len(row_seeds)} images)", batches * config.steps,
                                 unit="denoising steps", every=1.0,
                                 listener=lambda text: trainer.callback({"type": "phase", "epoch": trainer.epoch,
                                                                         "phase": text}))
        rewards, _ = score_rows(trainer.backend, trainer.reward, row_prompts, row_seeds, config,
                                progress=lambda done, total: progress.update(done))
        progress.finish()
        name = getattr(trainer.reward, "name", "reward")
        if not torch.isfinite(rewards).all():
            raise RuntimeError(f"reward {name!r} returned non-finite values on the held-out images: "
                               f"{rewards.tolist()}")
        return rewards.mean().item(), rewards.std(unbiased=False).item(), rewards

    def observe(self, epoch: int, eval_mean: float, train_mean: float) -> Dict[str, Any]:
        """Record one evaluation; returns its metrics (`eval/...`) and updates best and strikes."""
        if not (math.isfinite(eval_mean) and math.isfinite(train_mean)):
            raise ValueError(f"held-out evaluation at epoch {epoch}: non-finite reward "
                             f"({eval_mean}, training {train_mean})")
        self.evaluations.append({"epoch": epoch, "eval": eval_mean, "train": train_mean})
        is_best = self.best is None or eval_mean > self.best["eval"]
        if is_best:
            self.best = {"epoch": epoch, "eval": eval_mean, "train": train_mean}
            self.strikes = 0
        elif train_mean > self.best["train"]:
            self.strikes += 1          # held-out below its best while training reward rose
        else:
            self.strikes = 0
        if self.patience and self.strikes >= self.patience:
            self.stopped_early = True
        return {"eval/reward_mean": eval_mean, "eval/n": self.held_out.pairs, "eval/train_reward_mean": train_mean,
                "eval/best_reward_mean": self.best["eval"], "eval/best_epoch": self.best["epoch"],
                "eval/is_best": is_best, "eval/divergence_strikes": self.strikes}

    def record(self, trainer: MonitoredRun, eval_mean: float, train_mean: float) -> Tuple[Dict[str, Any], Optional[Path]]:
        """observe() the trainer's epoch, then save_best() a new best: (its metrics, the best
        folder written or None). Kept only once best/ holds a new best: a failed write restores
        the state before, so it (and a checkpoint of it) never names a best best/ lacks."""
        before = self.state_dict()
        metrics = self.observe(trainer.epoch, eval_mean, train_mean)
        try:
            return metrics, self.save_best(trainer) if metrics["eval/is_best"] else None
        except BaseException:
            self.load_state_dict(before)
            raise

    # --- state (in every checkpoint, so a resume keeps the best so far) ---------------
    def state_dict(self) -> Dict[str, Any]:
        return {"evaluations": [dict(e) for e in self.evaluations],
                "best": dict(self.best) if self.best else None,
                "strikes": self.strikes, "stopped_early": self.stopped_early}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        evaluations = state.get("evaluations", [])
        best = state.get("best")
        if (not isinstance(evaluations, list) or not all(_is_record(e) for e in evaluations)
                or not (best is None or _is_record(best)) or not isinstance(state.get("strikes", 0), int)):
            raise checkpoints.CheckpointError("the checkpoint's held-out state is malformed; the checkpoint "
                                              "is damaged, use another one")
        self.evaluations = [dict(e) for e in evaluations]
        self.best = dict(best) if best else None
        self.strikes = int(state.get("strikes", 0))
        self.stopped_early = bool(state.get("stopped_early", False))

    def adopt_saved_best(self, out_dir: Optional[Path]) -> bool:
        """After loading a checkpoint: take out_dir/best/best.json's record as the best so far
        when it is newer than the checkpoint's, names a checkpoint in best/ and scored the same
        pairs. True when adopted."""
        if out_dir is None:
            return False
        record = _saved_best(Path(out_dir) / BEST_FOLDER)
        if record is None or record["pairs"] != self._pairs() or (
                self.best is not None and record["epoch"] <= self.best["epoch"]):
            return False
        self.best = {"epoch": record["epoch"], "eval": record["eval/reward_mean"],
                     "train": record["train_reward_mean"]}
        self.strikes = 0               # a best resets the divergence count
        return True

    def _pairs(self) -> Dict[str, list]:
        """The scored pairs, as best.json records them: the prompts and every image's seed."""
        return {"prompts": list(self.held_out.prompts), "seeds": self.held_out.rows()[1]}

    # --- best/ ------------------------------------------------------------------------
    def save_best(self, trainer: MonitoredRun) -> Optional[Path]:
        """Write the trainer's current state as best/epoch_NNNNN (then drop older bests); None,
        writing nothing, when best.json records a higher held-out reward on the same pairs."""
        if trainer.out_dir is None:
            return None
        root = trainer.out_dir / BEST_FOLDER
        if root.exists() and not root.is_dir():
            raise RuntimeError(f"{root} is a file, not the best-checkpoint folder; move it away and resume")
        previous = _saved_best(root)
        if (previous is not None and previous["pairs"] == self._pairs()
                and previous["eval/reward_mean"] > self.best["eval"]):
            return None      # best/ holds a better LoRA on these pairs (see adopt_saved_best): kept
        target = checkpoints.write_checkpoint(
            root, trainer.epoch, False, lora=trainer.backend.lora_state_dict(),
            lora_metadata=trainer.lora_file_metadata(), optimizer_state_dict=trainer.optimizer.state_dict(),
            metrics=trainer.metrics[: trainer.epoch], config=trainer.config.to_dict(), extra=trainer.extra_state(),
            rng=torch.get_rng_state())
        record = {"epoch": self.best["epoch"], "eval/reward_mean": self.best["eval"],
                  "train_reward_mean": self.best["train"], "n": self.held_out.pairs,
                  "unit": "image, each with its own seed", "checkpoint": target.name,
                  "lora": f"{target.name}/{checkpoints.LORA_FILE}",
                  "pairs": self._pairs()}
        text = json.dumps(record, indent=1)
        atomic_write(root / BEST_RECORD, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        for older in checkpoints.list_checkpoints(root):     # only verified checkpoints this package wrote
            if older != target:
                shutil.rmtree(older, ignore_errors=True)
        return target


def best_checkpoint(out_dir: Path) -> Path:
    """The best checkpoint folder of a run (CheckpointError when there is none)."""
    found = checkpoints.list_checkpoints(Path(out_dir) / BEST_FOLDER)
    if not found:
        raise checkpoints.CheckpointError(f"no best checkpoint in {Path(out_dir) / BEST_FOLDER}; train with "
                                          "eval_every > 0")
    return found[-1]


def _saved_best(root: Path) -> Optional[Dict[str, Any]]:
    """best.json under `root` when it is well-formed and names a verified checkpoint there."""
    try:
        record = json.loads((root / BEST_RECORD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not (isinstance(record, dict) and isinstance(record.get("checkpoint"), str)
            and isinstance(record.get("pairs"), dict)
            and _is_record({"epoch": record.get("epoch"), "eval": record.get("eval/reward_mean"),
                            "train": record.get("train_reward_mean")})):
        return None
    folder = root / record["checkpoint"]
    if folder.parent != root or folder not in checkpoints.list_checkpoints(root):
        return None
    return record


def _is_record(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"epoch", "eval", "train"}
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in value.values()))


def shared_prompts(training: Sequence[str], held_out: HeldOutSet) -> int:
    """How many training prompts are also held-out prompts (one pass over the training set):
    an evaluation file that repeats training prompts does not measure unseen prompts."""
    held = set(held_out.prompts)
    return sum(1 for prompt in training if prompt in held)
