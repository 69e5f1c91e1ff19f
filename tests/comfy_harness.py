"""Run this package inside a real ComfyUI server, the way users do, from tests.

What is here, in the order a test needs it:

* ``find_comfyui_trees`` / ``require_comfyui_root``: the ComfyUI source trees to test
  against (COMFYUI_ROOTS, colon-separated, else COMFYUI_ROOT, else ~/ComfyUI), each with its
  version (tests/conftest.py parametrises the server fixtures over them).
* ``build_tiny_sd15_checkpoint`` / ``cached_tiny_sd15_checkpoint``: a random-weight,
  single-file checkpoint that ComfyUI's ``CheckpointLoaderSimple`` detects as SD1.5
  (built with ComfyUI's own model classes in a subprocess; never committed).
* ``ComfyServer``: a ``main.py --cpu`` server in a throw-away base directory, with this
  repository linked in as a custom node; it never writes into the ComfyUI tree.
* ``queue_prompt`` / ``wait_for`` / ``interrupt``: the HTTP + websocket protocol.
* ``workflow_to_api_prompt`` / ``override_inputs``: turn a UI-format workflow (what
  ``example_workflows/*.json`` hold) into the API prompt the frontend would queue.

The module imports only the standard library at import time, so collecting tests on a
machine without ComfyUI, torch or a websocket client costs nothing. Run it as a script to
build a checkpoint by hand: ``python tests/comfy_harness.py build-tiny-sd15 OUT.safetensors``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_LINK_NAME = "comfyui-prdp"


def workflow_files() -> list[Path]:
    """The shipped example workflows: ``example_workflows/`` (what ComfyUI's template browser
    reads), else the legacy ``workflows/``."""
    for name in ("example_workflows", "workflows"):
        files = sorted((REPO_ROOT / name).glob("*.json"))
        if files:
            return files
    return []

# --------------------------------------------------------------------------------------
# Locating ComfyUI
# --------------------------------------------------------------------------------------


def _is_comfyui_root(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "folder_paths.py").is_file()


@dataclass(frozen=True)
class ComfyTree:
    """One ComfyUI source tree to test against; ``root`` is None when ``problem`` says why not."""

    requested: str
    root: Path | None
    problem: str | None = None

    @property
    def version(self) -> str:
        return comfyui_version(self.root) if self.root else "missing"


def comfyui_version(root: Path) -> str:
    """ComfyUI's version from ``comfyui_version.py`` ("unknown" when the tree has none)."""
    import re

    file = Path(root) / "comfyui_version.py"
    text = file.read_text(errors="replace") if file.is_file() else ""
    found = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
    return found.group(1) if found else "unknown"


def _tree(requested: str) -> ComfyTree:
    path = Path(requested).expanduser()
    if _is_comfyui_root(path):
        return ComfyTree(requested, path.resolve())
    return ComfyTree(requested, None, f"{requested} is not a ComfyUI source tree (no main.py / comfy/ there)")


def find_comfyui_trees() -> list[ComfyTree]:
    """Every ComfyUI tree to test against, in order; never empty.

    Order: env ``COMFYUI_ROOTS`` (colon-separated), else env ``COMFYUI_ROOT``, else the
    ComfyUI whose ``custom_nodes/`` holds this repository, else ``~/ComfyUI``. A listed but
    wrong folder stays in the list with its problem (it is never silently replaced by
    another tree); with nothing found the one entry says how to provide a tree.
    """
    many = os.environ.get("COMFYUI_ROOTS")
    if many and many.strip(":"):
        trees, seen = [], set()
        for entry in (e.strip() for e in many.split(":")):
            tree = _tree(entry) if entry else None
            key = tree and (tree.root or entry)
            if tree and key not in seen:  # the same tree listed twice runs once
                seen.add(key)
                trees.append(tree)
        return trees
    env = os.environ.get("COMFYUI_ROOT")
    if env:
        return [_tree(env)]
    here = Path(__file__).absolute()
    for candidate in (here, here.resolve()):
        for parent in candidate.parents:
            if parent.name == "custom_nodes" and _is_comfyui_root(parent.parent):
                return [ComfyTree(str(parent.parent), parent.parent.resolve())]
    home = Path.home() / "ComfyUI"
    if _is_comfyui_root(home):
        return [ComfyTree(str(home), home.resolve())]
    return [ComfyTree("", None, comfyui_missing_reason())]


def tree_ids(trees: Iterable[ComfyTree]) -> list[str]:
    """Test ids naming each tree's version ("comfyui-0.3.64"; "-2" etc. for repeats)."""
    ids: list[str] = []
    for tree in trees:
        base = f"comfyui-{tree.version}" if tree.root else "no-comfyui"
        name, n = base, 1
        while name in ids:
            n += 1
            name = f"{base}-{n}"
        ids.append(name)
    return ids


def find_comfyui_root() -> Path | None:
    """The first ComfyUI tree (see ``find_comfyui_trees``), or None when it is unusable."""
    return find_comfyui_trees()[0].root


def comfyui_missing_reason() -> str:
    many = os.environ.get("COMFYUI_ROOTS")
    env = os.environ.get("COMFYUI_ROOT")
    if many and many.strip(":"):
        return f"COMFYUI_ROOTS={many} names no usable ComfyUI source tree"
    if env:
        return f"COMFYUI_ROOT={env} is not a ComfyUI source tree (no main.py / comfy/ there)"
    return ("no ComfyUI found: set COMFYUI_ROOTS (colon-separated) or COMFYUI_ROOT, or put this repository "
            "in ComfyUI/custom_nodes/, or clone ComfyUI to ~/ComfyUI (then run scripts/setup_comfyui.sh)")


def require_comfyui_root(tree: ComfyTree | None = None) -> Path:
    """The tree's root (default: the first tree), or skip the calling test with the reason."""
    tree = tree or find_comfyui_trees()[0]
    if tree.root is None:
        import pytest

        pytest.skip(tree.problem or comfyui_missing_reason())
    return tree.root


NON_ESSENTIAL_MARKER = "non essential"
NOT_REQUIRED_DISTRIBUTIONS = {"torch", "torchvision", "torchaudio"}


def missing_requirements(comfyui_root: Path) -> list[str]:
    """ComfyUI's essential requirements (plus ``requests``) not installed in this Python.

    torch/torchvision/torchaudio are not checked here: torch is the project's own
    dependency and ComfyUI runs without torchaudio (only its audio nodes fail to import).
    """
    import importlib.metadata
    import re

    names = ["requests"]
    requirements = comfyui_root / "requirements.txt"
    if requirements.is_file():
        for line in requirements.read_text().splitlines():
            if NON_ESSENTIAL_MARKER in line.lower():
                break
            line = line.split("#", 1)[0].strip()
            if line:
                names.append(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0])
    missing = []
    for name in names:
        if name.lower() in NOT_REQUIRED_DISTRIBUTIONS:
            continue
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def require_runnable_comfyui(tree: ComfyTree | None = None) -> Path:
    """The tree's root (default: the first tree), or skip when it is unusable or its
    requirements are missing."""
    root = require_comfyui_root(tree)
    missing = missing_requirements(root)
    if missing:
        import pytest

        pytest.skip(f"ComfyUI at {root} lacks its requirements {missing} in this Python "
                    f"({sys.executable}); run scripts/setup_comfyui.sh")
    return root


def package_import_failures(log: str, link_name: str = PACKAGE_LINK_NAME) -> list[str]:
    """Log lines saying this package failed to import (other packages' failures ignored)."""
    marker = f"custom_nodes{os.sep}{link_name}"
    return [line for line in log.splitlines()
            if marker in line and ("IMPORT FAILED" in line or "Cannot import" in line)]


# --------------------------------------------------------------------------------------
# Tiny SD1.5 checkpoint
# --------------------------------------------------------------------------------------

#: UNet layout: two levels of 320 channels, cross-attention at the half-resolution level
#: (and the middle block) only. ComfyUI's SD1.5 detector checks model_channels=320,
#: context_dim=768, no linear-in-transformer, no ADM, no temporal attention. ~36.7M params.
TINY_SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [1, 1], "channel_mult": [1, 1],
    "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
    "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False,
    "use_linear_in_transformer": False, "context_dim": 768, "adm_in_channels": None,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
#: The SD1.x VAE layout ComfyUI assumes for a single-file checkpoint.
SD_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
TINY_SD15_BUILDER_VERSION = "1"
TINY_SD15_FILENAME = "prdp_tiny_sd15.safetensors"

_CHECKPOINT_CACHE: dict[str, Path] = {}
_CHECKPOINT_LOCK = threading.Lock()


def build_tiny_sd15_checkpoint(path: str | os.PathLike, comfyui_root: str | os.PathLike | None = None,
                               python: str | None = None, verify: bool = True, timeout: float = 600) -> Path:
    """Write a random-weight SD1.5-detected checkpoint to ``path`` (atomically) and return it.

    Runs ComfyUI's model classes in a subprocess (so ComfyUI's global state never leaks into
    the test process): the tiny UNet above, the full CLIP-L text encoder (ComfyUI builds
    SD1.5's text encoder from a fixed config, so a smaller one is not loadable) and the SD
    VAE, every layer re-initialised and checked finite, stored in fp16 (~490 MB). With
    ``verify`` the file is loaded back through ``comfy.sd.load_checkpoint_guess_config`` and
    must come back as SD15 with a CLIP and a VAE.
    """
    root = Path(comfyui_root) if comfyui_root else find_comfyui_root()
    if root is None:
        raise FileNotFoundError(comfyui_missing_reason())
    out = Path(path).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python or sys.executable, str(Path(__file__).resolve()), "build-tiny-sd15", str(out),
           "--comfyui-root", str(root)]
    if not verify:
        cmd.append("--no-verify")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(out.parent))
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"building the tiny SD1.5 checkpoint failed (rc={proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out


def cached_tiny_sd15_checkpoint(cache_dir: str | os.PathLike, comfyui_root: str | os.PathLike | None = None) -> Path:
    """The tiny checkpoint, built once per process (test session) under ``cache_dir``.

    Each ComfyUI version builds (and verifies) its own file, so the builder is exercised on
    every tree tested. Env ``COMFY_HARNESS_CACHE_DIR`` overrides ``cache_dir`` to keep it
    across sessions.
    """
    root = Path(comfyui_root) if comfyui_root else find_comfyui_root()
    if root is None:
        raise FileNotFoundError(comfyui_missing_reason())
    base = Path(os.environ.get("COMFY_HARNESS_CACHE_DIR") or cache_dir)
    target = base / f"tiny_sd15_v{TINY_SD15_BUILDER_VERSION}" / f"comfyui-{comfyui_version(root)}" / TINY_SD15_FILENAME
    key = f"{root}|{target}"
    with _CHECKPOINT_LOCK:
        cached = _CHECKPOINT_CACHE.get(key)
        if cached is not None and cached.is_file():
            return cached
        if not target.is_file():
            build_tiny_sd15_checkpoint(target, root)
        _CHECKPOINT_CACHE[key] = target
        return target


def _import_comfy_cpu(comfyui_root: Path):
    """Import ComfyUI's model code in this process, CPU only, without parsing our argv."""
    sys.path.insert(0, str(comfyui_root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def _reset_all_parameters(module) -> None:
    """Initialise every layer: ComfyUI's ops classes turn ``reset_parameters`` into a no-op,
    so call the torch.nn implementation each layer inherits."""
    for sub in module.modules():
        for cls in type(sub).__mro__:
            if cls.__module__.startswith("torch.nn") and "reset_parameters" in cls.__dict__:
                cls.reset_parameters(sub)
                break


def checkpoint_state_dict(base_model, clip_state_dict: dict, vae_state_dict: dict) -> dict:
    """``BaseModel.state_dict_for_saving`` on either signature: before 2026-02 it took
    ``(clip_state_dict, vae_state_dict, ...)`` and read the UNet itself; since then it takes
    ``(unet_state_dict, clip_state_dict, vae_state_dict, ...)``. Passed by keyword either way."""
    import inspect

    parameters = inspect.signature(base_model.state_dict_for_saving).parameters
    parts = {"clip_state_dict": clip_state_dict, "vae_state_dict": vae_state_dict}
    if "unet_state_dict" in parameters:
        parts["unet_state_dict"] = base_model.diffusion_model.state_dict()
    missing = [name for name in parts if name not in parameters]
    if missing:
        raise TypeError(f"this ComfyUI's state_dict_for_saving{inspect.signature(base_model.state_dict_for_saving)} "
                        f"takes none of {missing}; update comfy_harness.checkpoint_state_dict")
    return base_model.state_dict_for_saving(**parts)


def write_fp16_checkpoint(state: dict, out: Path, metadata: dict) -> Path:
    """Write a checkpoint state dict, every tensor checked finite, floats as fp16, to a
    temporary file beside ``out`` (returned; the caller verifies it and moves it in place)."""
    import torch
    import comfy.utils

    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RuntimeError(f"non-finite tensors after initialisation: {bad[:10]}")
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    tmp = out.with_name(f".tmp{os.getpid()}.{out.name}")  # keeps the .safetensors suffix ComfyUI checks
    comfy.utils.save_torch_file(half, str(tmp), metadata=metadata)
    return tmp


def _build_tiny_sd15_here(out: Path, comfyui_root: Path, verify: bool) -> None:
    started = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    _import_comfy_cpu(comfyui_root)
    import torch
    import comfy.sd
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    torch.manual_seed(20240613)
    model_config = comfy.supported_models.SD15(TINY_SD15_UNET_CONFIG)
    model_config.set_inference_dtype(torch.float32, None)
    base_model = model_config.get_model({})
    _reset_all_parameters(base_model.diffusion_model)
    clip = comfy.sd.CLIP(model_config.clip_target(), parameters=0, model_options={"dtype": torch.float32})
    _reset_all_parameters(clip.cond_stage_model)
    vae = AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    _reset_all_parameters(vae)

    state = checkpoint_state_dict(base_model, clip.get_sd(), vae.state_dict())
    tmp = write_fp16_checkpoint(state, out, {"prdp_test_fixture": "random weights, tiny SD1.5 layout; not a real model",
                                             "builder_version": TINY_SD15_BUILDER_VERSION})
    built = time.time()
    if verify:
        patcher, clip_loaded, vae_loaded, _ = comfy.sd.load_checkpoint_guess_config(str(tmp))
        detected = type(patcher.model.model_config).__name__
        if detected != "SD15" or clip_loaded is None or vae_loaded is None:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"ComfyUI detected {detected}, clip={clip_loaded is not None}, "
                               f"vae={vae_loaded is not None}; expected SD15 with both")
    os.replace(tmp, out)
    unet_params = sum(p.numel() for p in base_model.diffusion_model.parameters())
    print(json.dumps({"path": str(out), "bytes": out.stat().st_size, "unet_params": unet_params,
                      "build_s": round(built - started, 1), "total_s": round(time.time() - started, 1)}))


# --------------------------------------------------------------------------------------
# HTTP helpers
# --------------------------------------------------------------------------------------


class PromptRejected(RuntimeError):
    """POST /prompt answered with an error (validation failed); ``.body`` holds the JSON."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        super().__init__(f"prompt rejected (HTTP {status}): {json.dumps(body)[:4000]}")


def http_json(method: str, url: str, payload: Any = None, timeout: float = 30) -> Any:
    """Send a request, return the decoded JSON answer (HTTPError propagates)."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def get_json(base_url: str, path: str, timeout: float = 30) -> Any:
    return http_json("GET", base_url.rstrip("/") + path, timeout=timeout)


def get_object_info(base_url: str) -> dict:
    return get_json(base_url, "/object_info", timeout=120)


def get_history(base_url: str, prompt_id: str) -> dict | None:
    return get_json(base_url, f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)


def interrupt(base_url: str, prompt_id: str | None = None) -> None:
    """Press Cancel: interrupt the running prompt (only ``prompt_id`` if given)."""
    http_json("POST", base_url.rstrip("/") + "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})


def fetch_output_file(base_url: str, item: Mapping[str, str]) -> bytes:
    """Bytes of an output entry such as ``{"filename", "subfolder", "type"}`` via GET /view."""
    query = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{base_url.rstrip('/')}/view?{query}", timeout=60) as response:
        return response.read()


# --------------------------------------------------------------------------------------
# Websocket events
# --------------------------------------------------------------------------------------


class EventListener:
    """Collects the websocket events of one client id in a background thread.

    Uses ``websocket-client`` when installed, else aiohttp (a ComfyUI requirement).
    Events are ``(type, data)`` tuples in arrival order; binary frames (previews) appear as
    ``("binary", {"bytes": n, "event": code})``.
    """

    def __init__(self, base_url: str, client_id: str | None = None, connect_timeout: float = 30,
                 backend: str = "auto"):
        if backend not in ("auto", "websocket-client", "aiohttp"):
            raise ValueError(f"backend={backend!r}: use auto, websocket-client or aiohttp")
        self.backend = backend
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.events: list[tuple[str, dict]] = []
        self._new_event = threading.Condition()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._error: BaseException | None = None
        ws_url = self.base_url.replace("http://", "ws://").replace("https://", "wss://")
        self._url = f"{ws_url}/ws?clientId={self.client_id}"
        self._thread = threading.Thread(target=self._run, name=f"comfy-ws-{self.client_id[:8]}", daemon=True)
        self._thread.start()
        if not self._connected.wait(connect_timeout):
            self.close()
            raise TimeoutError(f"websocket {self._url} did not connect: {self._error!r}")
        if self._error is not None:
            raise RuntimeError(f"websocket {self._url} failed: {self._error!r}")

    # -- reading
    def _record(self, raw: str | bytes) -> None:
        if isinstance(raw, (bytes, bytearray)):
            code = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
            event = ("binary", {"bytes": len(raw), "event": code})
        else:
            message = json.loads(raw)
            event = (message.get("type", "?"), message.get("data") or {})
        with self._new_event:
            self.events.append(event)
            self._new_event.notify_all()

    def _run(self) -> None:
        try:
            websocket = None
            if self.backend != "aiohttp":
                try:
                    import websocket  # websocket-client
                except ImportError:
                    if self.backend == "websocket-client":
                        raise
            if websocket is not None:
                self._run_websocket_client(websocket)
            else:
                self._run_aiohttp()
        except BaseException as exc:  # surfaced through connect / wait_for
            self._error = exc
        finally:
            self._connected.set()
            with self._new_event:
                self._new_event.notify_all()

    def _run_websocket_client(self, websocket) -> None:
        ws = websocket.create_connection(self._url, timeout=10)
        self._connected.set()
        ws.settimeout(0.5)
        try:
            while not self._stop.is_set():
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                except websocket.WebSocketConnectionClosedException:
                    break
                if raw in ("", b""):
                    continue
                self._record(raw)
        finally:
            ws.close()

    def _run_aiohttp(self) -> None:
        import asyncio

        import aiohttp

        async def main() -> None:
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(self._url, heartbeat=20) as ws:
                    self._connected.set()
                    while not self._stop.is_set():
                        try:
                            msg = await ws.receive(timeout=0.5)
                        except asyncio.TimeoutError:
                            continue
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            self._record(msg.data)
                        elif msg.type == aiohttp.WSMsgType.BINARY:
                            self._record(msg.data)
                        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            break

        asyncio.run(main())

    # -- API
    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait_for_event(self, predicate, timeout: float, start: int = 0) -> tuple[int, tuple[str, dict]] | None:
        """First event at index >= start matching ``predicate((type, data))``, waiting up to timeout."""
        deadline = time.monotonic() + timeout
        index = start
        with self._new_event:
            while True:
                while index < len(self.events):
                    if predicate(self.events[index]):
                        return index, self.events[index]
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return None
                self._new_event.wait(min(remaining, 0.5))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


_LISTENERS: dict[str, EventListener] = {}
_LISTENERS_LOCK = threading.Lock()
_PROMPT_LISTENER: dict[str, EventListener] = {}


def listener_for(base_url: str) -> EventListener:
    """The shared listener of ``base_url`` (connected on first use, reconnected if it died)."""
    key = base_url.rstrip("/")
    with _LISTENERS_LOCK:
        listener = _LISTENERS.get(key)
        if listener is None or not listener.alive:
            listener = EventListener(key)
            _LISTENERS[key] = listener
        return listener


def close_listeners(base_url: str) -> None:
    key = base_url.rstrip("/")
    with _LISTENERS_LOCK:
        listener = _LISTENERS.pop(key, None)
    if listener is not None:
        listener.close()


TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


@dataclass
class PromptResult:
    """How a queued prompt ended: ``status`` is "success", "error" or "interrupted"."""

    prompt_id: str
    status: str
    events: list[tuple[str, dict]] = field(default_factory=list)
    history: dict = field(default_factory=dict)
    error: dict | None = None

    @property
    def outputs(self) -> dict:
        return self.history.get("outputs", {})

    def events_of(self, prefix: str) -> list[dict]:
        """Data of events whose type equals ``prefix`` or starts with it (e.g. "prdp.")."""
        return [data for kind, data in self.events if kind == prefix or (prefix.endswith(".") and kind.startswith(prefix))]

    def describe(self) -> str:
        if self.error:
            return (f"{self.status}: node {self.error.get('node_id')} ({self.error.get('node_type')}): "
                    f"{self.error.get('exception_type')}: {self.error.get('exception_message')}\n"
                    + "".join(self.error.get("traceback") or []))
        return self.status


def queue_prompt(base_url: str, prompt: Mapping[str, Any], client_id: str | None = None,
                 extra_data: Mapping[str, Any] | None = None) -> str:
    """POST the API prompt and return its prompt_id.

    Without ``client_id`` the prompt is queued under the shared listener of ``base_url``
    (connected first, so no event is missed) and ``wait_for`` sees its websocket events.
    Raises ``PromptRejected`` with the server's node_errors when validation fails.
    """
    listener = None
    if client_id is None:
        listener = listener_for(base_url)
        client_id = listener.client_id
    payload: dict[str, Any] = {"prompt": prompt, "client_id": client_id}
    if extra_data:
        payload["extra_data"] = dict(extra_data)
    try:
        answer = http_json("POST", base_url.rstrip("/") + "/prompt", payload)
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = body.decode(errors="replace")
        raise PromptRejected(exc.code, parsed) from None
    if answer.get("node_errors"):
        raise PromptRejected(200, answer)
    prompt_id = answer["prompt_id"]
    if listener is not None:
        _PROMPT_LISTENER[prompt_id] = listener
    return prompt_id


def _status_from_history(entry: Mapping[str, Any]) -> tuple[str | None, dict | None]:
    messages = (entry.get("status") or {}).get("messages") or []
    for kind, data in messages:
        if kind == "execution_interrupted":
            return "interrupted", data
        if kind == "execution_error":
            return "error", data
        if kind == "execution_success":
            return "success", None
    status = entry.get("status") or {}
    if status.get("completed"):
        return "success", None
    if status.get("status_str") == "error":
        return "error", None
    return None, None


def wait_for(base_url: str, prompt_id: str, timeout: float = 300) -> PromptResult:
    """Wait until the prompt ends; return its status, websocket events and history entry.

    Ends on the websocket's execution_success / execution_error / execution_interrupted
    for this prompt, with /history polled each second as a fallback. The events returned
    are those carrying this prompt_id plus those without one (progress, custom "prdp.*")
    that arrived while it ran. Raises TimeoutError when it has not ended in time.
    """
    listener = _PROMPT_LISTENER.get(prompt_id)
    deadline = time.monotonic() + timeout
    status: str | None = None
    error: dict | None = None
    entry: dict | None = None

    def is_terminal(event: tuple[str, dict]) -> bool:
        return event[0] in TERMINAL_EVENTS and event[1].get("prompt_id") == prompt_id

    while status is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            recent = [e[0] for e in (listener.events[-15:] if listener else [])]
            raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s; last events {recent}")
        if listener is not None and listener.alive:
            found = listener.wait_for_event(is_terminal, timeout=min(1.0, remaining))
            if found is not None:
                kind, data = found[1]
                status = {"execution_success": "success", "execution_error": "error",
                          "execution_interrupted": "interrupted"}[kind]
                error = data if kind != "execution_success" else None
                break
        else:
            time.sleep(min(1.0, max(remaining, 0)))
        entry = get_history(base_url, prompt_id)
        if entry:
            status, error = _status_from_history(entry)
    # the history entry is written just after the terminal event is sent
    history_deadline = time.monotonic() + 30
    while entry is None and time.monotonic() < history_deadline:
        entry = get_history(base_url, prompt_id)
        if entry is None:
            time.sleep(0.2)
    events = _events_of_prompt(listener.events if listener else [], prompt_id)
    return PromptResult(prompt_id=prompt_id, status=status, events=events, history=entry or {}, error=error)


def _events_of_prompt(all_events: Iterable[tuple[str, dict]], prompt_id: str) -> list[tuple[str, dict]]:
    selected = []
    running = False
    for kind, data in list(all_events):
        own = isinstance(data, dict) and data.get("prompt_id") == prompt_id
        if kind == "execution_start" and own:
            running = True
        has_id = isinstance(data, dict) and "prompt_id" in data
        if own or (running and not has_id):
            selected.append((kind, data))
        if kind in TERMINAL_EVENTS and own:
            running = False
    return selected


# --------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# The real frontend in headless Chromium (browser tests)
# --------------------------------------------------------------------------------------

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
PAGE_TIMEOUT_MS = 120_000


def chromium_path() -> str:
    """Debian's Chromium (env PRDP_CHROMIUM overrides the path), or skip the calling test."""
    path = os.environ.get("PRDP_CHROMIUM", "/usr/bin/chromium")
    if not Path(path).is_file():
        import pytest

        pytest.skip(f"no Chromium at {path} (run scripts/install_chromium.sh or set PRDP_CHROMIUM)")
    return path


@contextlib.contextmanager
def browser_test_server(tmp_path_factory, name: str, tree: ComfyTree | None = None):
    """``comfy_test_server`` for a browser test module: skips first, before a server is
    started, when Chromium or the playwright package is missing."""
    import pytest

    chromium_path()
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with comfy_test_server(tmp_path_factory, name, tree=tree) as comfy:
        yield comfy


@contextlib.contextmanager
def headless_chromium():
    """A launched playwright Chromium (Debian's binary, never `playwright install`)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


def open_comfy_page(browser, base_url: str, width: int, height: int):
    """(context, page): the ComfyUI frontend loaded with its node types registered; page
    errors are collected in ``page.errors``. Close the context when done."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(base_url, wait_until="domcontentloaded", timeout=PAGE_TIMEOUT_MS)
    page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && "
                           "window.LiteGraph && Object.keys(LiteGraph.registered_node_types).length > 100",
                           timeout=PAGE_TIMEOUT_MS)
    return context, page


def set_page_widgets(page, values_by_type: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Set widget values on every node of each type through the graph API (with the widget's
    callback, as a person's edit runs it); returns the widgets that do not exist."""
    return page.evaluate(
        """(valuesByType) => {
            const problems = [];
            for (const [type, values] of Object.entries(valuesByType))
                for (const node of window.app.graph.nodes.filter(n => n.type === type))
                    for (const [name, value] of Object.entries(values)) {
                        const widget = (node.widgets || []).find(w => w.name === name);
                        if (!widget) { problems.push(`${type}.${name}: no such widget`); continue; }
                        widget.value = value;
                        widget.callback?.(value);
                    }
            window.app.graph.setDirtyCanvas(true, true);
            return problems;
        }""", dict(values_by_type))


def queue_from_page(base_url: str, page, timeout: float = 60) -> str:
    """Press Queue in the page (app.queuePrompt) and return the id of the prompt it queued."""
    known = set(get_json(base_url, "/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = get_json(base_url, "/queue")
        ids = [item[1] for item in queue.get("queue_running", []) + queue.get("queue_pending", [])]
        new = [i for i in ids + list(get_json(base_url, "/history")) if i not in known]
        if new:
            return new[0]
        time.sleep(0.2)
    raise AssertionError(f"the page queued nothing; page errors: {page.errors}")


# --------------------------------------------------------------------------------------
# UI workflow -> API prompt (what the frontend's graphToPrompt does)
# --------------------------------------------------------------------------------------

MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
VIRTUAL_NODE_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")


class WorkflowConversionError(ValueError):
    pass


def _input_specs(info: Mapping[str, Any]) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of the required then optional inputs, in declared order."""
    specs = []
    inputs = info.get("input", {})
    order = info.get("input_order", {})
    for section in ("required", "optional"):
        declared = inputs.get(section) or {}
        for name in order.get(section) or list(declared):
            spec = declared[name]
            kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
            options = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, kind, options))
    return specs


def _is_widget(kind: Any, options: Mapping[str, Any]) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _widget_layout(info: Mapping[str, Any]) -> list[tuple[str | None, bool]]:
    """The node's widgets in creation order: (input name, serialized) per widget.

    Mirrors the frontend: an INT with ``control_after_generate`` (or named seed/noise_seed)
    is followed by a non-serialized control widget; a combo with it by a control widget and
    a filter widget; an upload combo by an upload button.
    """
    layout: list[tuple[str | None, bool]] = []
    for name, kind, options in _input_specs(info):
        if not _is_widget(kind, options):
            continue
        layout.append((name, True))
        is_combo = isinstance(kind, list) or kind == "COMBO"
        if kind == "INT" and (options.get("control_after_generate") or
                              ("control_after_generate" not in options and name in ("seed", "noise_seed"))):
            layout.append((None, False))
        elif is_combo and options.get("control_after_generate"):
            layout.extend([(None, False), (None, False)])
        if is_combo and any(options.get(flag) for flag in UPLOAD_OPTIONS):
            layout.append((None, False))
    return layout


def _widget_values(node: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
    values = node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, dict):  # some nodes save widgets by name
        return {k: v for k, v in values.items() if k in {n for n, _, _ in _input_specs(info)}}
    result: dict[str, Any] = {}
    for (name, serialized), value in zip(_widget_layout(info), values):
        if serialized and name is not None:
            result[name] = {"__value__": value} if isinstance(value, list) else value
    return result


def _types_compatible(a: str, b: str) -> bool:
    if a in ("*", "") or b in ("*", "") or a == b:
        return True
    return bool(set(str(a).split(",")) & set(str(b).split(",")))


def workflow_to_api_prompt(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict:
    """Convert a UI-format workflow (version 0.4) to the API prompt the frontend queues.

    Widget values are matched to widget inputs in INPUT_TYPES order (control_after_generate
    and upload-button values skipped); links become ``[node_id, slot]``, overriding widget
    values of converted widget inputs; muted (mode 2) nodes are dropped with the inputs
    linked to them; bypassed (mode 4) nodes pass a matching input through; Reroutes are
    followed; a PrimitiveNode's value is written into the widgets it feeds; Notes vanish.
    """
    subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
    if subgraphs:
        subgraph_ids = {s.get("id") for s in subgraphs}
        used = [n["type"] for n in workflow.get("nodes", []) if n.get("type") in subgraph_ids]
        if used:
            raise WorkflowConversionError(f"subgraph nodes are not supported by this converter: {used}")
    nodes = {str(n["id"]): n for n in workflow.get("nodes", [])}
    links: dict[int, tuple[str, int, str, int, str]] = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link.get("type", "*")]
        link_id, from_node, from_slot, to_node, to_slot = link[:5]
        links[int(link_id)] = (str(from_node), int(from_slot), str(to_node), int(to_slot), link[5] if len(link) > 5 else "*")

    def is_virtual(node: Mapping[str, Any]) -> bool:
        return node.get("type") in VIRTUAL_NODE_TYPES or (node.get("type") not in object_info and not node.get("inputs") and not node.get("outputs"))

    for node in nodes.values():
        if node.get("type") in VIRTUAL_NODE_TYPES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        if node.get("type") not in object_info:
            raise WorkflowConversionError(f"node {node['id']} has type {node.get('type')!r}, which this server "
                                          "does not know (missing node type)")

    def input_link(node: Mapping[str, Any], slot: int) -> int | None:
        inputs = node.get("inputs") or []
        return inputs[slot].get("link") if slot < len(inputs) else None

    def resolve_input(node: Mapping[str, Any], slot: int, wanted_type: str | None, seen: set) -> tuple[str, int] | None:
        key = (str(node["id"]), "I", slot)
        if key in seen:
            raise WorkflowConversionError(f"circular link through node {node['id']}")
        seen.add(key)
        link_id = input_link(node, slot)
        if link_id is None:
            return None
        if link_id not in links:
            raise WorkflowConversionError(f"node {node['id']} input {slot} refers to missing link {link_id}")
        from_node, from_slot, _, _, _ = links[link_id]
        if from_node not in nodes:
            raise WorkflowConversionError(f"link {link_id} comes from missing node {from_node}")
        input_type = wanted_type or (node.get("inputs") or [])[slot].get("type", "*")
        return resolve_output(nodes[from_node], from_slot, input_type, seen)

    def resolve_output(node: Mapping[str, Any], slot: int, wanted_type: str, seen: set) -> tuple[str, int] | None:
        key = (str(node["id"]), "O", slot)
        if key in seen:
            raise WorkflowConversionError(f"circular link through node {node['id']}")
        seen.add(key)
        inputs = node.get("inputs") or []
        if node.get("mode", MODE_ALWAYS) == MODE_BYPASS:
            outputs = node.get("outputs") or []
            output_type = outputs[slot].get("type", "*") if slot < len(outputs) else "*"
            if wanted_type in ("*", ""):
                index = slot if len(inputs) > slot else 0
            elif slot < len(inputs) and _types_compatible(inputs[slot].get("type", "*"), output_type) \
                    and _types_compatible(inputs[slot].get("type", "*"), wanted_type):
                index = slot
            else:
                index = next((i for i, inp in enumerate(inputs) if inp.get("type") == wanted_type), -1)
                if index == -1:
                    index = next((i for i, inp in enumerate(inputs)
                                  if _types_compatible(inp.get("type", "*"), output_type)
                                  and _types_compatible(inp.get("type", "*"), wanted_type)), -1)
            if index == -1 or index >= len(inputs):
                return None
            return resolve_input(node, index, None, seen)
        if is_virtual(node):
            if slot < len(inputs):  # Reroute: output n mirrors input n
                return resolve_input(node, slot, wanted_type, seen)
            return None  # PrimitiveNode: its value is applied to the target widget
        return str(node["id"]), slot

    # PrimitiveNode.applyToGraph: copy the primitive's value into every widget it feeds
    primitive_values: dict[tuple[str, str], Any] = {}
    for node in nodes.values():
        if node.get("type") != "PrimitiveNode" or node.get("mode", MODE_ALWAYS) == MODE_NEVER:
            continue
        values = node.get("widgets_values") or []
        if not values:
            continue
        for output in node.get("outputs") or []:
            for link_id in output.get("links") or []:
                if link_id in links:
                    _, _, to_node, to_slot, _ = links[link_id]
                    target = nodes.get(to_node)
                    target_inputs = (target or {}).get("inputs") or []
                    if to_slot < len(target_inputs):
                        widget = target_inputs[to_slot].get("widget") or {}
                        name = widget.get("name", target_inputs[to_slot].get("name"))
                        primitive_values[(to_node, name)] = values[0]

    prompt: dict[str, dict] = {}
    for node_id, node in nodes.items():
        if is_virtual(node) or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info[node["type"]]
        inputs: dict[str, Any] = _widget_values(node, info)
        for (target, name), value in primitive_values.items():
            if target == node_id:
                inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for slot, slot_info in enumerate(node.get("inputs") or []):
            resolved = resolve_input(node, slot, None, set())
            if resolved is not None:
                inputs[slot_info["name"]] = [resolved[0], resolved[1]]
        prompt[node_id] = {"inputs": inputs, "class_type": node["type"],
                           "_meta": {"title": node.get("title") or info.get("display_name") or node["type"]}}
    for entry in prompt.values():  # inputs linked to dropped (muted) nodes
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def override_inputs(prompt: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]], *,
                    strict: bool = True) -> dict:
    """A copy of ``prompt`` with input values replaced.

    Keys of ``overrides`` are node ids or class types (every node of that type). With
    ``strict`` a key matching no node is an error (so a renamed node cannot silently make a
    test run with full-size settings); a linked input is never overwritten by a value.
    """
    result = copy.deepcopy(dict(prompt))
    for key, values in overrides.items():
        targets = [key] if key in result else [nid for nid, n in result.items() if n.get("class_type") == key]
        if not targets:
            if strict:
                raise KeyError(f"override target {key!r} matches no node id or class_type in the prompt "
                               f"(classes: {sorted({n.get('class_type') for n in result.values()})})")
            continue
        for node_id in targets:
            inputs = result[node_id].setdefault("inputs", {})
            for name, value in values.items():
                current = inputs.get(name)
                if isinstance(current, list) and len(current) == 2 and isinstance(current[0], str) and current[0] in result:
                    continue
                inputs[name] = value
    return result


def nodes_of_type(prompt: Mapping[str, Any], class_type: str) -> list[str]:
    return [nid for nid, n in prompt.items() if n.get("class_type") == class_type]


class UiWorkflowBuilder:
    """Build a UI-format (version 0.4) workflow by hand, shaped like the frontend saves it.

    Socket and widget inputs come from ``object_info`` (a widget input is listed with a
    ``widget`` entry, as the 1.2x frontend saves it); ``widgets`` are given by name and laid
    out in widget order, with a control value after seed-like widgets.
    """

    def __init__(self, object_info: Mapping[str, Any]):
        self.object_info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, class_type: str, widgets: Mapping[str, Any] | None = None, *, mode: int = MODE_ALWAYS,
             title: str | None = None, control: str = "fixed") -> int:
        node_id = len(self.nodes) + 1
        node: dict[str, Any] = {"id": node_id, "type": class_type, "pos": [node_id * 40, node_id * 30],
                                "size": [300, 120], "flags": {}, "order": node_id - 1, "mode": mode,
                                "properties": {"Node name for S&R": class_type}}
        if title:
            node["title"] = title
        if class_type in ("Note", "MarkdownNote"):
            node.update(inputs=[], outputs=[], widgets_values=[(widgets or {}).get("text", "")])
        elif class_type == "Reroute":
            node.update(inputs=[{"name": "", "type": "*", "link": None}],
                        outputs=[{"name": "", "type": "*", "links": []}], widgets_values=[])
        elif class_type == "PrimitiveNode":
            node.update(inputs=[], outputs=[{"name": "connect to widget input", "type": "*", "links": [],
                                             "widget": {"name": "value"}}],
                        widgets_values=[(widgets or {})["value"], control])
        else:
            info = self.object_info[class_type]
            inputs, values = [], []
            layout = _widget_layout(info)
            specs = {name: (kind, options) for name, kind, options in _input_specs(info)}
            for name, kind, options in _input_specs(info):
                entry = {"name": name, "type": "COMBO" if isinstance(kind, list) else kind, "link": None}
                if _is_widget(kind, options):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            for name, serialized in layout:
                if serialized:
                    kind, options = specs[name]
                    default = options.get("default", kind[0] if isinstance(kind, list) and kind else None)
                    values.append((widgets or {}).get(name, default))
                else:
                    values.append(control)
            outputs = [{"name": out_name, "type": out_type, "links": [], "slot_index": i}
                       for i, (out_type, out_name) in enumerate(zip(info.get("output", []), info.get("output_name", [])))]
            node.update(inputs=inputs, outputs=outputs, widgets_values=values)
        self.nodes.append(node)
        return node_id

    def link(self, from_node: int, from_slot: int, to_node: int, to_input: str | int) -> int:
        source, target = self.nodes[from_node - 1], self.nodes[to_node - 1]
        if isinstance(to_input, int):
            slot = to_input
        else:
            slot = next(i for i, inp in enumerate(target["inputs"]) if inp["name"] == to_input)
        link_id = len(self.links) + 1
        link_type = source["outputs"][from_slot]["type"]
        target["inputs"][slot]["link"] = link_id
        source["outputs"][from_slot]["links"].append(link_id)
        self.links.append([link_id, from_node, from_slot, to_node, slot, link_type])
        return link_id

    def build(self) -> dict:
        return {"id": str(uuid.uuid4()), "revision": 0, "last_node_id": len(self.nodes),
                "last_link_id": len(self.links), "nodes": copy.deepcopy(self.nodes),
                "links": copy.deepcopy(self.links), "groups": [], "config": {}, "extra": {}, "version": 0.4}


#: Tiny CPU settings shared by the tests: 64x64 images, and a PRDP run of seconds.
TINY_IMAGE_SIZE = 64
TINY_TRAINING = {"epochs": 2, "prompts_per_epoch": 1, "images_per_prompt": 2, "steps": 2,
                 "width": TINY_IMAGE_SIZE, "height": TINY_IMAGE_SIZE, "lora_rank": 2, "learning_rate": 3e-3,
                 "updates_per_epoch": 1, "seed": 5}


def core_ui_workflow(object_info, ckpt_name: str) -> dict:
    """Checkpoint -> text encode x2 -> (bypassed upscale) -> KSampler -> VAEDecode -> SaveImage,
    with a Reroute, a PrimitiveNode seed, a Note and a muted node, as a user would save it."""
    g = UiWorkflowBuilder(object_info)
    ckpt = g.node("CheckpointLoaderSimple", {"ckpt_name": ckpt_name})
    positive = g.node("CLIPTextEncode", {"text": "a red apple on a table"})
    negative = g.node("CLIPTextEncode", {"text": "blurry"})
    latent = g.node("EmptyLatentImage", {"width": TINY_IMAGE_SIZE, "height": TINY_IMAGE_SIZE, "batch_size": 1})
    upscale = g.node("LatentUpscaleBy", {"upscale_method": "nearest-exact", "scale_by": 2.0}, mode=MODE_BYPASS)
    sampler = g.node("KSampler", {"seed": 7, "steps": 2, "cfg": 4.0, "sampler_name": "euler",
                                  "scheduler": "normal", "denoise": 1.0}, control="randomize")
    decode = g.node("VAEDecode")
    save = g.node("SaveImage", {"filename_prefix": "harness/core"})
    reroute = g.node("Reroute")
    seed = g.node("PrimitiveNode", {"value": 11})
    g.node("Note", {"text": "tiny CPU test graph"})
    muted_save = g.node("SaveImage", {"filename_prefix": "harness/muted"}, mode=MODE_NEVER)
    g.link(ckpt, 0, reroute, 0)
    g.link(reroute, 0, sampler, "model")
    g.link(ckpt, 1, positive, "clip")
    g.link(ckpt, 1, negative, "clip")
    g.link(positive, 0, sampler, "positive")
    g.link(negative, 0, sampler, "negative")
    g.link(latent, 0, upscale, "samples")
    g.link(upscale, 0, sampler, "latent_image")
    g.link(seed, 0, sampler, "seed")
    g.link(sampler, 0, decode, "samples")
    g.link(ckpt, 2, decode, "vae")
    g.link(decode, 0, save, "images")
    g.link(decode, 0, muted_save, "images")
    return g.build()


# --------------------------------------------------------------------------------------
# Script entry point (the checkpoint builder subprocess)
# --------------------------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-tiny-sd15", help="write a random-weight SD1.5-detected checkpoint")
    build.add_argument("out", type=Path)
    build.add_argument("--comfyui-root", type=Path, default=None)
    build.add_argument("--no-verify", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "build-tiny-sd15":
        root = args.comfyui_root or find_comfyui_root()
        if root is None:
            print(comfyui_missing_reason(), file=sys.stderr)
            return 2
        _build_tiny_sd15_here(args.out.absolute(), root.resolve(), verify=not args.no_verify)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
