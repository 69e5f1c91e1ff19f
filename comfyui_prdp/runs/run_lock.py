"""One training run per output folder: an exclusive `fcntl.flock` on a lock file inside it.

The lock is held for the whole run and released by the kernel when the process ends, however
it ends, so a stale lock never blocks a later run. The lock file holds the owner's pid, which
the refusal message names.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional

LOCK_FILE = ".prdp_run.lock"


class FolderInUse(RuntimeError):
    """Another process holds the folder's lock."""


class RunLock:
    """`with RunLock(folder):` holds the folder's lock; a second holder fails at once."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(fd)
            os.close(fd)
            raise FolderInUse(f"{self.folder} is in use by another training run (pid {owner}); wait for it to "
                              "finish or choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"
