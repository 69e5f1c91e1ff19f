"""The human reward: a person's choices among each prompt's images, asked through the ballot
box (ballots.py) and the HTTP routes (service/ballot_routes.py), turned into rewards
(choices.py).

Use: build it (node "PRDP Human Choice Reward", nodes/human_reward.py), hand it to the trainer,
and attach it to the run before `Trainer.run`:

    reward = HumanReward(assist=None, assist_weight=0.0, time_limit=0.0, on_timeout="wait")
    trainer = Trainer(backend, reward, prompts, config, out_dir=run_dir, stop_event=job.stop_event,
                      callback=job.record)
    reward.attach_run(trainer, job)      # the ballot box in run_dir, the routes find it via the job

The group structure comes from the trainer explicitly: `config.images_per_prompt` images per
prompt, rows prompt-major (EpochBatch), the epoch from `trainer.epoch`. One process only
(refused with world_size > 1: the other ranks have no run folder and no person to ask).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..base import Reward, reward_device_bytes
from .ballots import BallotBox
from .carry_over import carry_over
from .choices import rewards_for_answers, with_assist

ON_TIMEOUT = ("wait", "skip", "assist")


@dataclass
class _Binding:
    box: BallotBox
    stop_event: threading.Event
    images_per_prompt: int
    epoch: Callable[[], int]          # the 0-based epoch being trained
    seed: int
    callback: Callable[[dict], None]


class HumanReward(Reward):
    """Rewards from a person's answers (choices.py), one ballot per epoch.

    assist: an optional reward whose scores, min-max normalised within each prompt's group and
    times `assist_weight`, are added to the person's (breaking ties, standing in for skipped
    prompts; weight 0: off). time_limit: seconds a ballot waits (0: no limit); then on_timeout:
    "wait" keeps waiting, "skip" trains the epoch with equal rewards (no pairs), "assist" uses
    the assist's scores alone (needs an assist with a weight above 0).
    """

    name = "human"

    def __init__(self, assist: Optional[Any] = None, assist_weight: float = 0.0, time_limit: float = 0.0,
                 on_timeout: str = "wait", poll_seconds: float = 0.05):
        if on_timeout not in ON_TIMEOUT:
            raise ValueError(f"on_timeout must be one of {', '.join(ON_TIMEOUT)}, not {on_timeout!r}")
        if not (isinstance(assist_weight, (int, float)) and math.isfinite(assist_weight) and assist_weight >= 0):
            raise ValueError(f"assist_weight must be a number >= 0 (0: off), not {assist_weight!r}")
        if not (isinstance(time_limit, (int, float)) and math.isfinite(time_limit) and time_limit >= 0):
            raise ValueError(f"time_limit must be seconds >= 0 (0: no limit), not {time_limit!r}")
        if on_timeout == "assist" and (assist is None or assist_weight <= 0):
            raise ValueError("on_timeout 'assist' needs an assist reward with assist_weight above 0; connect one "
                             "(and set its weight) or choose on_timeout 'wait' or 'skip'")
        if assist is not None and not callable(getattr(assist, "score", None)):
            raise TypeError(f"assist must be a reward (with a score method), not {type(assist).__name__}")
        self.assist = assist
        self.assist_weight = float(assist_weight)
        self.time_limit = float(time_limit)
        self.on_timeout = on_timeout
        self.poll_seconds = poll_seconds
        self._binding: Optional[_Binding] = None

    # --- binding to a run -----------------------------------------------------------------
    def attach_run(self, trainer: Any, job: Any = None, resume_from: Optional[Path] = None) -> BallotBox:
        """Ask through the ballot box in the trainer's run folder; `job` (service/jobs.py) makes
        the ballot reachable through the HTTP routes. `resume_from`: the checkpoint the run will
        resume; when it lies in another run folder, the person's record and open ballot come
        along (carry_over.py)."""
        world_size = getattr(getattr(trainer, "dist", None), "world_size", 1)
        if world_size > 1:
            raise ValueError(f"the human reward works in one process only, not with {world_size} processes: "
                             "one person answers one ballot per epoch; train it without torchrun")
        if getattr(trainer, "out_dir", None) is None:
            raise ValueError("the human reward needs the run's output folder (the images and the person's "
                             "choices are kept there); give the trainer an out_dir")
        box = self.attach(trainer.out_dir, trainer.stop_event, trainer.config.images_per_prompt,
                          epoch=lambda: trainer.epoch, seed=trainer.config.seed, callback=trainer.callback)
        if resume_from is not None:
            carry_over(box, Path(resume_from))
        if job is not None:
            job.ballot_box = box
        return box

    def attach(self, run_dir: Path, stop_event: threading.Event, images_per_prompt: int,
               epoch: Callable[[], int], seed: int = 0,
               callback: Optional[Callable[[dict], None]] = None) -> BallotBox:
        """The explicit form of attach_run (no trainer needed)."""
        if images_per_prompt < 2:
            raise ValueError("the human reward needs at least 2 images per prompt to choose between")
        box = BallotBox(Path(run_dir))
        self._binding = _Binding(box, stop_event, int(images_per_prompt), epoch, int(seed),
                                 callback or (lambda event: None))
        return box

    @property
    def ballot_box(self) -> Optional[BallotBox]:
        return None if self._binding is None else self._binding.box

    # --- Reward ----------------------------------------------------------------------------
    def device_bytes(self) -> int:
        return reward_device_bytes(self.assist) if self.assist is not None and self.assist_weight > 0 else 0

    def score(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        return self.score_with_components(images, prompts)[0]

    def score_with_components(self, images: torch.Tensor, prompts: List[str]
                              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        bound = self._binding
        if bound is None:
            raise RuntimeError("the human reward is not attached to a training run: it asks a person through "
                               "PRDP Train LoRA's dashboard (reward.attach_run(trainer, job) before training); "
                               "it cannot score images on its own (e.g. in Score Images)")
        B = bound.images_per_prompt
        count = int(images.shape[0])
        if count != len(prompts) or count % B:
            raise ValueError(f"the human reward got {count} images for {len(prompts)} prompts; expected "
                             f"{B} images per prompt, prompt-major")
        groups = [prompts[k * B] for k in range(count // B)]
        if any(prompts[k * B + i] != groups[k] for k in range(len(groups)) for i in range(B)):
            raise ValueError(f"the human reward expects each prompt's {B} images consecutively")
        epoch = int(bound.epoch())
        ballot = bound.box.open(epoch + 1, groups, images, B, seed=bound.seed,
                                noise_seeds=_noise_seeds(bound.seed, epoch, len(groups), B))
        if not ballot.answered:
            left = len(groups)
            bound.callback({"type": "ballot", "epoch": epoch + 1, "ballot": ballot.id, "prompts": left})
            bound.callback({"type": "phase", "epoch": epoch + 1, "phase": waiting_phase(left)})
        answered = ballot.answered or bound.box.wait(ballot, bound.stop_event, self.time_limit, self.poll_seconds)
        if not answered and self.on_timeout == "wait":
            bound.callback({"type": "phase", "epoch": epoch + 1,
                            "phase": "waiting for your choice (the time limit passed; still waiting)"})
            answered = bound.box.wait(ballot, bound.stop_event, 0.0, self.poll_seconds)
        if not answered and not bound.box.close(ballot, f"timeout: {self.on_timeout}"):
            answered = True          # an answer came in while closing: use it
        human = rewards_for_answers(ballot.answers, B) if answered else [None] * len(groups)
        assist = self._assist_scores(images, prompts)
        total = torch.cat([with_assist(human[k], None if assist is None else assist[k * B:(k + 1) * B],
                                       self.assist_weight, B) for k in range(len(groups))])
        components = {"human": torch.cat([torch.zeros(B) if h is None else h for h in human])}
        if assist is not None:
            components["assist"] = assist
        return total, components

    def _assist_scores(self, images: torch.Tensor, prompts: List[str]) -> Optional[torch.Tensor]:
        if self.assist is None or self.assist_weight <= 0:
            return None
        prepare, offload = getattr(self.assist, "prepare", None), getattr(self.assist, "offload", None)
        if callable(prepare):
            prepare()
        try:
            with torch.no_grad():
                scores = self.assist.score(images, prompts)
        finally:
            if callable(offload):
                offload()
        return scores.detach().float().cpu()


def waiting_phase(prompts: int) -> str:
    """The phase while a ballot of `prompts` prompts waits, in the dashboard's words (web/prdp_ballot.js
    counts down the prompts left as the person answers them)."""
    return f"waiting for your choice ({prompts} of {prompts} prompt{'s' if prompts != 1 else ''} left)"


def _noise_seeds(seed: int, epoch: int, groups: int, B: int) -> List[List[int]]:
    """The seed of each image's noise generator (training/batches.trajectory_generators)."""
    from ...training.batches import trajectory_generators
    generators = trajectory_generators(seed, epoch, range(groups * B))
    return [[generators[k * B + i].initial_seed() for i in range(B)] for k in range(groups)]
