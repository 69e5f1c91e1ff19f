"""torch.distributed for the trainer: which rank owns which prompt groups, and the few
collectives one epoch needs (no transport of our own; NCCL on GPUs, gloo on CPUs).

A run's result does not depend on the number of ranks: every rank draws the same prompts and
update order from the shared epoch generator, samples only its own contiguous block of prompt
groups (a group never spans ranks, so PRDP's pairs stay local), and the LoRA gradients are
summed over ranks once per optimizer step. Every rank holds the same weights and optimizer
state, so any rank could write a checkpoint; rank 0 alone writes files.

Messages between ranks are tensors (JSON text as bytes where a value is not numeric): nothing
is ever unpickled. An error on one rank reaches the others as a flag in these collectives
(faults.py), so no rank is left waiting in one.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional, Sequence

import torch

#: torchrun's environment variables
ENV_RANK, ENV_WORLD, ENV_LOCAL_RANK = "RANK", "WORLD_SIZE", "LOCAL_RANK"
#: minutes a rank waits in a collective for the others before the run aborts (NCCL's own
#: default, 10, is shorter than rank 0's held-out evaluation of a large model)
ENV_TIMEOUT = "PRDP_DIST_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 60.0


class DistributedError(RuntimeError):
    """A distributed run cannot start or its ranks disagree."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in a run. The default is the single process of a plain run,
    for which every collective is the identity (and costs nothing)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")   # where collectives' tensors live (cuda for NCCL)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ----------------------------------------------------------------- sharding
    def shard_sizes(self, n: int) -> List[int]:
        """How many of n items each rank owns: contiguous blocks, the first n % world ranks
        one more."""
        base, extra = divmod(n, self.world_size)
        return [base + (1 if r < extra else 0) for r in range(self.world_size)]

    def shard(self, n: int) -> range:
        """The items of [0, n) this rank owns (a contiguous block; see shard_sizes)."""
        sizes = self.shard_sizes(n)
        first = sum(sizes[: self.rank])
        return range(first, first + sizes[self.rank])

    def check_shardable(self, prompts_per_epoch: int) -> None:
        """Refuse (before any work) an epoch with fewer prompt groups than ranks."""
        if prompts_per_epoch < self.world_size:
            raise DistributedError(
                f"prompts_per_epoch={prompts_per_epoch} is less than the {self.world_size} ranks: every rank "
                f"samples whole prompt groups, so use at least {self.world_size} prompts per epoch or fewer "
                "processes (--nproc_per_node)")

    # ----------------------------------------------------------------- collectives
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks in place (returns it)."""
        if self.enabled:
            on_comm = tensor.to(self.device)
            torch.distributed.all_reduce(on_comm, op=torch.distributed.ReduceOp.SUM)
            if on_comm is not tensor:
                tensor.copy_(on_comm)
        return tensor

    def max(self, value: float) -> float:
        """The largest `value` over ranks (NaN only where every rank has NaN)."""
        return self.maxima(value)[0]

    def maxima(self, *values: float) -> List[float]:
        """The largest of each of `values` over ranks, in one all-reduce (NaN only where every
        rank has NaN)."""
        if not self.enabled:
            return list(values)
        packed = torch.tensor([v if v == v else float("-inf") for v in values], dtype=torch.float64,
                              device=self.device)
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX)
        return [float("nan") if v == float("-inf") else v for v in packed.tolist()]

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on at least one."""
        return self.flags(flag)[0]

    def flags(self, *flags: bool) -> List[bool]:
        """For each of `flags`: true on every rank when it is true on at least one (one all-reduce)."""
        if not self.enabled:
            return [bool(flag) for flag in flags]
        packed = torch.tensor([1 if flag else 0 for flag in flags], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX)
        return [bool(v) for v in packed.tolist()]

    def gather_text(self, text: str, size: int) -> List[str]:
        """Every rank's `text` in rank order, each cut to `size` UTF-8 bytes (one all-gather of
        fixed-size byte tensors; for rare messages such as an error)."""
        data = text.encode("utf-8")[:size].decode("utf-8", errors="ignore").encode("utf-8")
        if not self.enabled:
            return [data.decode("utf-8")]
        local = torch.zeros(size + 8, dtype=torch.uint8, device=self.device)
        local[:8] = torch.tensor(list(len(data).to_bytes(8, "little")), dtype=torch.uint8)
        if data:
            local[8:8 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        pieces = [torch.empty_like(local) for _ in range(self.world_size)]
        torch.distributed.all_gather(pieces, local)
        texts = []
        for piece in pieces:
            raw = bytes(piece.cpu().tolist())
            length = min(int.from_bytes(raw[:8], "little"), size)
            texts.append(raw[8:8 + length].decode("utf-8", errors="replace"))
        return texts

    def gather_rows(self, local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Concatenate every rank's rows in rank order (rank r holds sizes[r] rows): the
        tensor a single process would have. CPU tensor out."""
        if not self.enabled:
            return local
        if len(local) != sizes[self.rank]:
            raise DistributedError(f"rank {self.rank} has {len(local)} rows; expected {sizes[self.rank]}")
        longest = max(sizes)
        padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[: len(local)] = local.to(self.device)
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(pieces, padded)
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)]).cpu()

    def broadcast_parameters(self, params: Sequence[torch.Tensor]) -> None:
        """Give every rank rank 0's values of `params` (the LoRA's start)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for p in params:
                on_comm = p.detach().to(self.device)
                torch.distributed.broadcast(on_comm, src=0)
                if on_comm is not p:
                    p.copy_(on_comm)

    def broadcast_json(self, value: Any = None) -> Any:
        """Rank 0's JSON-serialisable `value` on every rank (other ranks' argument is ignored)."""
        if not self.enabled:
            return value
        data = json.dumps(value).encode("utf-8") if self.is_main else b""
        length = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(length, src=0)
        buffer = torch.zeros(int(length.item()), dtype=torch.uint8, device=self.device)
        if self.is_main:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        torch.distributed.broadcast(buffer, src=0)
        return json.loads(bytes(buffer.cpu().tolist()).decode("utf-8"))

    def check_same(self, what: str, text: str) -> None:
        """Raise on every rank when `text` (e.g. the configuration as JSON) differs between ranks."""
        if not self.enabled:
            return
        digest = zlib.crc32(text.encode("utf-8"))
        packed = torch.tensor([digest, -digest], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX)
        if packed[0].item() != -packed[1].item():
            raise DistributedError(f"the ranks were started with different {what}; start every rank with the "
                                   "same command line and files")


SINGLE = Distributed()


def launched_by_torchrun(environ=os.environ) -> bool:
    """True when this process is one rank of a multi-process launch (torchrun, SLURM + torchrun)."""
    return int(environ.get(ENV_WORLD, "1") or 1) > 1


def rank_device(requested: Optional[str], local_rank: int) -> str:
    """The device of this rank: cuda:LOCAL_RANK when CUDA is asked for (or is the default and
    available), else the CPU. An explicit index (cuda:1) is refused: each rank takes its own."""
    if requested is not None and requested.startswith("cuda:"):
        raise DistributedError(f"--device {requested}: under torchrun each rank uses cuda:LOCAL_RANK; give "
                               "--device cuda (choose GPUs with CUDA_VISIBLE_DEVICES)")
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{local_rank}" if requested == "cuda" else requested


def collective_timeout(environ=os.environ) -> timedelta:
    """How long a rank waits in a collective: $PRDP_DIST_TIMEOUT_MINUTES, default 60 minutes."""
    text = environ.get(ENV_TIMEOUT, "").strip()
    if not text:
        return timedelta(minutes=DEFAULT_TIMEOUT_MINUTES)
    try:
        minutes = float(text)
    except ValueError:
        minutes = float("nan")
    if not (math.isfinite(minutes) and minutes > 0):
        raise DistributedError(f"{ENV_TIMEOUT}={text!r}: give the minutes a rank may wait for the others as a "
                               f"positive number (default {DEFAULT_TIMEOUT_MINUTES:g})")
    return timedelta(minutes=minutes)


def init_from_env(device: str, environ=os.environ) -> Distributed:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): NCCL when this rank computes on a GPU, gloo otherwise; collectives wait up
    to collective_timeout() for the slowest rank."""
    try:
        rank, world, local_rank = (int(environ[k]) for k in (ENV_RANK, ENV_WORLD, ENV_LOCAL_RANK))
    except (KeyError, ValueError):
        raise DistributedError("WORLD_SIZE > 1 but RANK/LOCAL_RANK are missing: start the ranks with "
                               "torchrun --nproc_per_node=G -m comfyui_prdp train ...") from None
    timeout = collective_timeout(environ)
    use_nccl = device.startswith("cuda")
    if use_nccl:
        torch.cuda.set_device(torch.device(device))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_nccl else "gloo", rank=rank, world_size=world,
                                             timeout=timeout)
    return Distributed(rank, world, local_rank, torch.device(device) if use_nccl else torch.device("cpu"))


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
