"""What every PRDP node shares: the category, type names, and lazy access to ComfyUI.

Nothing here imports ComfyUI at import time; inside ComfyUI the modules are already loaded,
outside it (tests, docs) the helpers degrade to harmless defaults.
"""
from __future__ import annotations

import sys
from typing import Optional

CATEGORY = "PRDP"
REWARD_TYPE = "PRDP_REWARD"
LORA_MODEL_TYPE = "LORA_MODEL"


def folder_paths_module():
    """ComfyUI's `folder_paths`, or None outside ComfyUI."""
    module = sys.modules.get("folder_paths")
    if module is not None:
        return module
    try:
        import folder_paths  # type: ignore
    except ImportError:
        return None
    return folder_paths


def prompt_server():
    """The running ComfyUI PromptServer, or None. Never imports ComfyUI's server module
    (that would start building a server); it is already loaded inside ComfyUI."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    return instance


def send_event(event: str, data: dict) -> None:
    """A websocket message to the client that queued the prompt (no-op outside ComfyUI)."""
    server = prompt_server()
    if server is None:
        return
    try:
        server.send_sync(event, data, getattr(server, "client_id", None))
    except Exception:  # noqa: BLE001  (a closed socket must not fail training)
        pass


def comfy_device_name() -> Optional[str]:
    """ComfyUI's compute device as a string, or None outside ComfyUI."""
    management = sys.modules.get("comfy.model_management")
    if management is None:
        return None
    return str(management.get_torch_device())
