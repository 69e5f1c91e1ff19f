"""A real ComfyUI server (``main.py --cpu``) in a throw-away base directory, with this repository
linked in as a custom node; it never writes into the ComfyUI tree."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from typing import Any, Iterable, Mapping

from harness_events import PromptResult, close_listeners, queue_prompt, wait_for
from harness_http import get_json, get_object_info, interrupt
from harness_tiny_sd15 import cached_tiny_sd15_checkpoint
from harness_trees import (PACKAGE_LINK_NAME, REPO_ROOT, ComfyTree, comfyui_missing_reason, comfyui_version,
                           find_comfyui_root, require_runnable_comfyui)


def package_overlay_for(comfyui_root: Path, python: str | None = None) -> Path | None:
    """The folder of ComfyUI packages pinned by this tree but installed at other versions
    (frontend, workflow templates, ...), unpacked by scripts/setup_comfyui.sh into
    ``<env>/comfyui-overlays/<ComfyUI version>``; None when the tree needs none."""
    prefix = Path(python).absolute().parent.parent if python else Path(sys.prefix)
    overlay = prefix / "comfyui-overlays" / comfyui_version(comfyui_root)
    return overlay if (overlay / "PINS").is_file() else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """A real ComfyUI server (``main.py --cpu``) for tests; a context manager.

    Everything it writes lives under ``workdir``: ``base/`` is ComfyUI's base directory
    (models/, custom_nodes/, input/, output/, temp/, user/) and ``comfyui.log`` its log.
    This repository is symlinked as ``base/custom_nodes/comfyui-prdp``; ``checkpoints`` and
    ``loras`` files are symlinked into ``base/models/...``. An extra-model-paths YAML names
    the checkpoints, loras, reward_models and custom_nodes folders. The database is in
    memory, so nothing is written into the ComfyUI tree.
    """

    def __init__(self, workdir: str | os.PathLike, comfyui_root: str | os.PathLike | None = None, *,
                 checkpoints: Iterable[str | os.PathLike] = (), loras: Iterable[str | os.PathLike] = (),
                 package_dir: str | os.PathLike = REPO_ROOT, extra_args: Iterable[str] = (),
                 python: str | None = None, startup_timeout: float = 240, env: Mapping[str, str] | None = None):
        root = Path(comfyui_root) if comfyui_root else find_comfyui_root()
        if root is None:
            raise FileNotFoundError(comfyui_missing_reason())
        self.comfyui_root = root
        self.workdir = Path(workdir).absolute()
        self.base_dir = self.workdir / "base"
        self.models_dir = self.base_dir / "models"
        self.output_dir = self.base_dir / "output"
        self.input_dir = self.base_dir / "input"
        self.user_dir = self.base_dir / "user"
        self.custom_nodes_dir = self.base_dir / "custom_nodes"
        self.log_path = self.workdir / "comfyui.log"
        self.package_dir = Path(package_dir).resolve()
        self._checkpoints = [Path(p) for p in checkpoints]
        self._loras = [Path(p) for p in loras]
        self._extra_args = list(extra_args)
        self._python = python or sys.executable
        self._startup_timeout = startup_timeout
        self._env = dict(env or {})
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self.startup_seconds: float | None = None

    # -- layout
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def checkpoints_dir(self) -> Path:
        return self.models_dir / "checkpoints"

    @property
    def loras_dir(self) -> Path:
        return self.models_dir / "loras"

    @property
    def reward_models_dir(self) -> Path:
        return self.models_dir / "reward_models"

    def _prepare(self) -> list[str]:
        for folder in (self.checkpoints_dir, self.loras_dir, self.reward_models_dir, self.output_dir,
                       self.input_dir, self.custom_nodes_dir, self.user_dir / "default", self.workdir / "tmp"):
            folder.mkdir(parents=True, exist_ok=True)
        link = self.custom_nodes_dir / PACKAGE_LINK_NAME
        if not link.exists():
            link.symlink_to(self.package_dir, target_is_directory=True)
        for source, folder in [(p, self.checkpoints_dir) for p in self._checkpoints] + \
                              [(p, self.loras_dir) for p in self._loras]:
            target = folder / source.name
            if not target.exists():
                target.symlink_to(source.resolve())
        settings = self.user_dir / "default" / "comfy.settings.json"
        if not settings.exists():
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}, indent=1))
        extra_paths = self.workdir / "extra_model_paths.yaml"
        extra_paths.write_text(
            "prdp_test:\n"
            f"    base_path: {json.dumps(str(self.base_dir))}\n"
            "    checkpoints: models/checkpoints\n"
            "    loras: models/loras\n"
            "    reward_models: models/reward_models\n"
            "    custom_nodes: custom_nodes\n")
        self.port = free_port()
        return [self._python, str(self.comfyui_root / "main.py"), "--cpu", "--listen", "127.0.0.1",
                "--port", str(self.port), "--disable-auto-launch", "--disable-api-nodes",
                "--base-directory", str(self.base_dir), "--output-directory", str(self.output_dir),
                "--input-directory", str(self.input_dir), "--temp-directory", str(self.workdir / "tmp"),
                "--user-directory", str(self.user_dir), "--extra-model-paths-config", str(extra_paths),
                "--database-url", "sqlite:///:memory:", *self._extra_args]

    # -- lifecycle
    def start(self) -> "ComfyServer":
        command = self._prepare()
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "DO_NOT_TRACK": "1"})
        overlay = package_overlay_for(self.comfyui_root, self._python)
        if overlay is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(overlay), *filter(None, [env.get("PYTHONPATH")])])
        env.update(self._env)
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(("$ " + " ".join(command) + "\n").encode())
        self._log_file.flush()
        started = time.monotonic()
        self.process = subprocess.Popen(command, cwd=str(self.workdir), stdout=self._log_file,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_ready(self, started: float) -> None:
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} during startup:\n"
                                   f"{self.log_tail()}")
            try:
                get_json(self.base_url, "/system_stats", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            if time.monotonic() - started > self._startup_timeout:
                raise TimeoutError(f"ComfyUI not ready after {self._startup_timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def stop(self, timeout: float = 15) -> None:
        """Stop the server and everything it started (its process group)."""
        if self.port is not None:
            close_listeners(self.base_url)
        proc = self.process
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if proc is not None:
            try:  # stray children left in the group after the main process ended
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- log
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_mark(self) -> int:
        """A position in the log; pass it to ``log_since`` to read what came after."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, mark: int) -> str:
        with open(self.log_path, "rb") as handle:
            handle.seek(mark)
            return handle.read().decode(errors="replace")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    # -- protocol shortcuts
    def object_info(self) -> dict:
        return get_object_info(self.base_url)

    def queue(self, prompt: Mapping[str, Any]) -> str:
        return queue_prompt(self.base_url, prompt)

    def run(self, prompt: Mapping[str, Any], timeout: float = 300) -> PromptResult:
        return wait_for(self.base_url, self.queue(prompt), timeout)

    def interrupt(self, prompt_id: str | None = None) -> None:
        interrupt(self.base_url, prompt_id)

    def output_path(self, item: Mapping[str, str]) -> Path:
        """Local path of an output entry ``{"filename", "subfolder", "type": "output"}``."""
        folder = {"output": self.output_dir, "temp": self.workdir / "tmp" / "temp", "input": self.input_dir}[item.get("type", "output")]
        return folder / item.get("subfolder", "") / item["filename"]


@contextlib.contextmanager
def comfy_test_server(tmp_path_factory, name: str = "comfy", with_checkpoint: bool = True,
                      tree: ComfyTree | None = None, **kwargs):
    """A started ``ComfyServer`` of ``tree`` (default: the first tree) for a pytest module;
    skips when that tree is unusable.

    ``tmp_path_factory`` is pytest's; the tiny checkpoint is built once per session and
    ComfyUI version and linked into the server's checkpoints folder when ``with_checkpoint``.
    """
    root = require_runnable_comfyui(tree)
    checkpoints = list(kwargs.pop("checkpoints", ()))
    if with_checkpoint:
        checkpoints.append(cached_tiny_sd15_checkpoint(tmp_path_factory.getbasetemp() / "comfy_harness_cache", root))
    server = ComfyServer(tmp_path_factory.mktemp(f"{name}-{comfyui_version(root)}"), root,
                         checkpoints=checkpoints, **kwargs)
    with server:
        yield server
