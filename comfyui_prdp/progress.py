"""Progress of the long phases outside the training epochs: pretraining an embedded model,
loading a model, the held-out evaluation.

A phase reports `done` of `total` units; PhaseProgress turns that into one line such as
"pretraining the embedded model: 40 % (160/400 steps), about 27 s left" and hands it to the
listener in context (`phase_listener`: the trainer's callback, a node's dashboard phase), else
writes it to stderr. Lines are sent at the start, at most every `every` seconds, and at the end,
so a phase of a few seconds prints two lines and a long one never stays silent.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from typing import Callable, Iterator, Optional

Listener = Callable[[str], None]

_LISTENER: "contextvars.ContextVar[Optional[Listener]]" = contextvars.ContextVar("prdp_phase_listener",
                                                                                 default=None)
#: seconds between two progress lines of one phase (the first and last are always sent)
EVERY_SECONDS = 5.0


@contextlib.contextmanager
def phase_listener(listener: Optional[Listener]) -> Iterator[None]:
    """Send the phase lines of the body to `listener` (None: to stderr)."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class PhaseProgress:
    """One phase of `total` units (steps, images); see the module docstring."""

    def __init__(self, phase: str, total: int, unit: str = "steps", every: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic, listener: Optional[Listener] = None):
        self.phase, self.total, self.unit, self.clock = phase, max(1, int(total)), unit, clock
        self.every = EVERY_SECONDS if every is None else every
        self.listener = listener or _LISTENER.get() or _to_stderr
        self.started = clock()
        self.sent_at = self.started
        self.done = 0
        self.listener(f"{phase}: 0/{self.total} {unit}")

    def text(self) -> str:
        """'<phase>: 40 % (160/400 steps), about 27 s left' (no estimate before the first unit)."""
        elapsed = self.clock() - self.started
        line = f"{self.phase}: {100 * self.done / self.total:.0f} % ({self.done}/{self.total} {self.unit})"
        if 0 < self.done < self.total:
            line += f", about {format_duration(elapsed * (self.total - self.done) / self.done)} left"
        return line

    def update(self, done: int) -> None:
        """`done` units of `total` finished; a line when `every` seconds passed since the last."""
        self.done = min(int(done), self.total)
        if self.done < self.total and self.clock() - self.sent_at >= self.every:
            self.sent_at = self.clock()
            self.listener(self.text())

    def finish(self) -> None:
        """The last line: the phase is done, and how long it took."""
        self.done = self.total
        self.listener(f"{self.phase}: done in {format_duration(self.clock() - self.started)}")


@contextlib.contextmanager
def timed_phase(phase: str, clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """A phase without countable units (loading a model): a line when it starts and one with its
    duration when it ends (not when it fails: the error says enough)."""
    listener = _LISTENER.get() or _to_stderr
    started = clock()
    listener(f"{phase} ...")
    yield
    listener(f"{phase}: done in {format_duration(clock() - started)}")
