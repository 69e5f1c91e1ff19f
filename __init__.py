"""comfyui-prdp: PRDP reward finetuning for ComfyUI (the package ComfyUI loads).

ComfyUI imports this file by path under a mangled module name; everything below uses
relative imports. Importing it outside ComfyUI (pytest collects this folder) is harmless: no
ComfyUI module is imported here, and the HTTP routes are registered only when ComfyUI's
server is running.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

try:
    from .comfyui_prdp import routes as _routes

    _routes.register()
except Exception as _error:  # noqa: BLE001  (the nodes must load even if the routes cannot)
    import logging as _logging

    _logging.getLogger(__name__).warning("comfyui-prdp: HTTP routes not registered: %s", _error)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
