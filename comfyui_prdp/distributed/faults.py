"""An error on one rank of a distributed run ends every rank at the same point.

A rank whose work raises (a reward server gone, non-finite images, out of memory on one GPU)
keeps the error instead of raising (`RankFaults.attempt`), skips the rest of its work up to
the next collective and sends a flag in it: the stop flag's all-reduce, the gradient
all-reduce of an optimizer step, the on-policy maximum. Every rank sees the flag there, the
ranks' messages are gathered once (fixed-size UTF-8 bytes, no pickling) and every rank raises
RankFailed, which names the failing ranks and their errors; the trainer then writes the state
from the start of the failed epoch as its stop checkpoint. A single process runs its work
directly: its errors raise as they always did.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Type

from .group import Distributed, DistributedError

#: the longest error message a rank sends (UTF-8 bytes; longer ones are cut)
MESSAGE_BYTES = 2000


class RankFailed(DistributedError):
    """Raised on every rank of a distributed run when the work of at least one rank raised."""

    def __init__(self, failures: Dict[int, str]):
        self.failures = dict(failures)      # rank -> "ErrorType in <epoch and phase>: message"
        self.checkpoint: Optional[Path] = None          # written by rank 0 (Trainer.run)
        self.checkpoint_error: Optional[str] = None
        super().__init__()

    def __str__(self) -> str:
        ranks = ", ".join(str(rank) for rank in sorted(self.failures))
        which = f"rank {ranks}" if len(self.failures) == 1 else f"ranks {ranks}"
        lines = [f"{which} failed, so every rank stopped at the same point:"]
        lines += [f"  rank {rank}: {message}" for rank, message in sorted(self.failures.items())]
        if self.checkpoint is not None:
            lines.append(f"checkpoint: {self.checkpoint} (the last finished epoch; fix the cause, then continue "
                         "with --resume)")
        elif self.checkpoint_error is not None:
            lines.append(f"the checkpoint could not be written either: {self.checkpoint_error}")
        return "\n".join(lines)


class RankFaults:
    """This rank's error, kept for the next collective (see the module docstring)."""

    def __init__(self, dist: Distributed, passthrough: Tuple[Type[BaseException], ...] = ()):
        self.dist = dist
        self.passthrough = passthrough      # exceptions that are not failures (a stop request)
        self.error: Optional[BaseException] = None
        self.phase = ""                     # what this rank is doing (the trainer sets it)
        self.where = ""                     # the phase of the kept error

    @property
    def failed(self) -> bool:
        return self.error is not None

    def attempt(self, work: Callable[..., Any], *args, **kwargs) -> Any:
        """work(*args, **kwargs). Distributed, an error is kept and None returned, and once this
        rank has failed no more work runs (None) until the next collective raises RankFailed."""
        if not self.dist.enabled:
            return work(*args, **kwargs)
        if self.error is not None:
            return None
        try:
            return work(*args, **kwargs)
        except self.passthrough:
            raise
        except Exception as error:         # noqa: BLE001 - every error ends every rank (check)
            self.error, self.where = error, self.phase or "training"
            return None

    def check(self, any_failed: bool) -> None:
        """After a collective that carried `failed`: raise RankFailed on every rank when any
        rank failed (then, and only then, one all-gather of the messages)."""
        if not any_failed:
            return
        local = f"{type(self.error).__name__} in {self.where}: {self.error}" if self.error is not None else ""
        texts = self.dist.gather_text(local, MESSAGE_BYTES)
        raise RankFailed({rank: text for rank, text in enumerate(texts) if text}) from self.error
