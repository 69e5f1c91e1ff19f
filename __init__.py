"""comfyui-prdp: PRDP reward finetuning for ComfyUI (the package ComfyUI loads).

ComfyUI imports this file by path under a mangled module name; everything below uses
relative imports. Importing it outside ComfyUI (pytest collects this folder) is harmless: no
ComfyUI module is imported here, and the HTTP routes are registered only when ComfyUI's
server is running. Packages of requirements.txt that are not installed are named in one log
line (comfyui_prdp/dependencies.py); the nodes still load when they can.
"""
import logging as _logging

from .comfyui_prdp.dependencies import missing_dependencies_line as _missing_dependencies_line

# a clone without `pip install -r requirements.txt`: say so in one line, not a traceback later
try:
    _MISSING = _missing_dependencies_line()
except Exception as _error:  # noqa: BLE001  (a check that fails must not keep the nodes from loading)
    _MISSING = ""
    _logging.getLogger("comfyui-prdp").warning("comfyui-prdp: could not check the requirements: %s", _error)
if _MISSING:
    _logging.getLogger("comfyui-prdp").error(_MISSING)

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as _error:
    if _MISSING:  # ComfyUI's "Cannot import ..." line then carries the same message, and the cause
        raise ImportError(f"{_MISSING} ({type(_error).__name__}: {_error})") from None
    raise

WEB_DIRECTORY = "./web"

try:
    from .comfyui_prdp.service import routes as _routes

    _routes.register()
except Exception as _error:  # noqa: BLE001  (the nodes must load even if the routes cannot)
    _logging.getLogger(__name__).warning("comfyui-prdp: HTTP routes not registered: %s", _error)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
