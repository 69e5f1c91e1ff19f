"""What one epoch samples and how it is cut: the per-(seed, epoch) generators, the epoch's
batch of trajectories, and the micro-batches the update evaluates them in."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..sampling import Trajectories


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, stream)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + stream) % (2 ** 63))


def trajectory_generators(seed: int, epoch: int, rows: range) -> List[torch.Generator]:
    """One CPU generator per trajectory, depending only on (seed, epoch, trajectory index): a
    trajectory's noise is the same whichever rank samples it and in whichever batch."""
    def seeded(index: int) -> torch.Generator:
        digest = hashlib.blake2b(f"prdp-trajectory:{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") % (2 ** 63))
    return [seeded(index) for index in rows]


@dataclass
class EpochBatch:
    """Everything sampled in one epoch, grouped by prompt: rows are prompt-major (N*B)."""
    prompts: List[str]          # N prompts of this epoch
    cond: Dict[str, torch.Tensor]  # conditioning per trajectory [N*B, ...]
    uncond: Dict[str, torch.Tensor]
    traj: Trajectories
    logp_ref: torch.Tensor      # [N*B, T] float64
    rewards: torch.Tensor       # [N*B]
    images: torch.Tensor        # [N*B, H, W, 3]
    advantages: Optional[torch.Tensor] = None   # [N*B], DDPO with the per-prompt tracker
    # distributed runs: this rank holds prompt groups first_group ... first_group + len(prompts)
    # of the epoch's epoch_prompts (all ranks' N); the fields above are this rank's rows only
    first_group: int = 0
    epoch_prompts: Optional[List[str]] = None

    @property
    def all_prompts(self) -> List[str]:
        return self.prompts if self.epoch_prompts is None else self.epoch_prompts

    @property
    def row_prompts(self) -> List[str]:
        per_prompt = len(self.traj.logp) // max(1, len(self.prompts))
        return [p for p in self.prompts for _ in range(per_prompt)]


def micro_batches(rows: torch.Tensor, steps: torch.Tensor, sample_batch_size: int,
                  train_batch_size: int) -> List[torch.Tensor]:
    """Positions k of the transitions (rows[k], steps[k]) grouped into model calls of at most
    train_batch_size rows, laid out as sampling evaluated them where that fits.

    Why: kernels round differently at other batch sizes (GPUs ~1e-6-1e-5 per log-prob; this
    CPU 8.4e-7 on the embedded UNet with 2-row sampling batches re-evaluated 4 or 8 at a time),
    which at a clip range of 1e-6 decides the clip mask. With train_batch_size >=
    sample_batch_size each call is the rows of one sampling batch (row // sample_batch_size,
    rows numbered as sampled) at one step, in row order: the model inputs each transition was
    recorded with, so unchanged weights give the recorded log-prob (exactly on this CPU, where
    the old packing was off by 8.4e-7). Exact when every sampling batch is whole in the
    minibatch (always when sample_batch_size divides images_per_prompt, or minibatch_prompts
    is unset). Trade-off: train_batch_size stays the memory bound, so with a larger
    sample_batch_size no call can match sampling's, and transitions are packed row-major,
    train_batch_size at a time, as before; with a smaller one the calls hold
    sample_batch_size rows, more and smaller calls than packing would make.
    """
    if len(rows) == 0:
        return []
    if train_batch_size < sample_batch_size:
        return list(torch.arange(len(rows)).split(train_batch_size))
    rows, steps = rows.cpu().long(), steps.cpu().long()
    group = (rows // sample_batch_size) * (int(steps.max()) + 1) + steps      # (sampling batch, step)
    order = torch.argsort(group * (int(rows.max()) + 1) + rows)                # unique keys
    _, sizes = torch.unique_consecutive(group[order], return_counts=True)
    return list(order.split(sizes.tolist()))
