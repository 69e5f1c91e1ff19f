"""Ways to ask a CLI training run to stop with a checkpoint: SIGTERM (what SLURM and torchrun
send), Ctrl-C in a distributed run, and a stop file. Each only sets the trainer's stop event;
the trainer stops at its next step (every rank at the same one) and writes one checkpoint.
A second signal of the same kind falls back to the default action (stop at once). torchrun
forwards a signal it gets to every rank once and kills them TORCH_ELASTIC_SHUTDOWN_TIMEOUT
seconds later (default 30): set it above the time of one optimizer step plus a checkpoint.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Iterator, List, Optional

POLL_SECONDS = 0.5


def check_stop_file(path: Optional[Path]) -> None:
    """Refuse a stop file that exists before the run starts (it would stop the run at once)."""
    if path is not None and Path(path).exists():
        raise SystemExit(f"error: --stop-file {path} exists already; delete it to start (create it later "
                         "to stop the run with a checkpoint)")


@contextlib.contextmanager
def stop_requests(event: threading.Event, *, interrupt: bool = False,
                  stop_file: Optional[Path] = None) -> Iterator[None]:
    """While inside: SIGTERM (and SIGINT when `interrupt`) and the appearance of `stop_file`
    set `event`. Signal handlers are installed only from the main thread."""
    restore: List[tuple] = []
    if threading.current_thread() is threading.main_thread():
        kinds = [signal.SIGTERM] + ([signal.SIGINT] if interrupt else [])
        for kind in kinds:
            previous = signal.getsignal(kind)

            seen: List[int] = []      # this kind's signals so far

            def handler(number, frame, previous=previous, seen=seen):
                if seen:               # this signal a second time: do what it did before
                    signal.signal(number, previous)
                    signal.raise_signal(number)
                    return
                seen.append(number)
                event.set()

            signal.signal(kind, handler)
            restore.append((kind, previous))
    done = threading.Event()
    watcher = None
    if stop_file is not None:
        def watch() -> None:
            while not done.wait(POLL_SECONDS):
                if Path(stop_file).exists():
                    event.set()
                    return
        watcher = threading.Thread(target=watch, name="prdp-stop-file", daemon=True)
        watcher.start()
    try:
        yield
    finally:
        done.set()
        if watcher is not None:
            watcher.join()
        for kind, previous in restore:
            signal.signal(kind, previous)


class StopRequested(Exception):
    """Raised inside the loop (or a backend's model call) when the stop event is set; the trainer
    saves and returns."""
