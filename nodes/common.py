"""What every PRDP node shares: the category, type names, and lazy access to ComfyUI.

Nothing here imports ComfyUI at import time; inside ComfyUI the modules are already loaded,
outside it (tests, docs) the helpers degrade to harmless defaults.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

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


def workflow_id(extra_pnginfo) -> Optional[str]:
    """The id the frontend gave the queued workflow (its `id`, sent in extra_pnginfo), or None:
    with the node id it names "this node of this workflow" across tabs and page reloads."""
    workflow = extra_pnginfo.get("workflow") if isinstance(extra_pnginfo, dict) else None
    value = workflow.get("id") if isinstance(workflow, dict) else None
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None


def comfy_device_name() -> Optional[str]:
    """ComfyUI's compute device as a string, or None outside ComfyUI."""
    management = sys.modules.get("comfy.model_management")
    if management is None:
        return None
    return str(management.get_torch_device())


# --- widget checks for VALIDATE_INPUTS -----------------------------------------------------------
class FormRefused(ValueError):
    """Raised by VALIDATE_INPUTS with every problem of the form in one message.

    Why raise instead of returning the message: ComfyUI (execution.validate_inputs) attaches a
    returned string to every input VALIDATE_INPUTS names, so the same text would appear once
    per widget; an exception is reported once for the node."""


def widget_specs(input_types: Mapping[str, Any]) -> Dict[str, Tuple[Any, dict]]:
    """name -> (kind, options) of the required and optional inputs of an INPUT_TYPES dict."""
    return {name: (kind, options[0] if options else {})
            for section in ("required", "optional")
            for name, (kind, *options) in input_types.get(section, {}).items()}


def _range_problem(name: str, value, options: Mapping[str, Any]) -> Optional[str]:
    if "min" in options and value < options["min"]:
        return f"{name}={value}: at least {options['min']}"
    if "max" in options and value > options["max"]:
        return f"{name}={value}: at most {options['max']}"
    return None


def widget_problem(name: str, kind: Any, options: Mapping[str, Any], value: Any) -> Optional[str]:
    """What is wrong with one widget value against its declared kind, choices and min/max."""
    if isinstance(kind, (list, tuple)):
        if value in kind:
            return None
        shown = ", ".join(map(str, kind[:6])) + (", ..." if len(kind) > 6 else "")
        return f"{name}={value!r} is not one of the choices ({shown}); pick one from the list"
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name}={value!r}: must be a whole number"
        return _range_problem(name, value, options)
    if kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{name}={value!r}: must be a number"
        if not math.isfinite(value):
            return f"{name}={value}: must be a finite number (not inf or nan)"
        return _range_problem(name, value, options)
    if kind == "STRING" and not isinstance(value, str):
        return f"{name}={value!r}: must be text"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{name}={value!r}: must be true or false"
    return None


def widget_problems(input_types: Mapping[str, Any], values: Mapping[str, Any]) -> Dict[str, str]:
    """name -> problem for every widget value that breaks its declaration in `input_types`.
    None (a widget fed by a link: its value is not known while validating) is skipped."""
    specs = widget_specs(input_types)
    problems = {}
    for name, value in values.items():
        if name in specs and value is not None:
            problem = widget_problem(name, *specs[name], value)
            if problem:
                problems[name] = problem
    return problems


def refuse(node_title: str, problems: List[str]) -> None:
    """Raise FormRefused listing `problems` (nothing when there are none)."""
    if problems:
        raise FormRefused(f"{node_title}: " + "; ".join(problems))
