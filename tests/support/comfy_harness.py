"""Run this package inside a real ComfyUI server, the way users do, from tests: one import for
the test modules (``import comfy_harness as harness``), re-exporting the harness's parts.

In the order a test needs them:

* ``harness_trees``: the ComfyUI source trees to test against (COMFYUI_ROOTS, colon-separated,
  else COMFYUI_ROOT, else ~/ComfyUI), each with its version, and whether a tree can run here.
* ``harness_tiny_sd15``: a random-weight, single-file checkpoint that ComfyUI's
  ``CheckpointLoaderSimple`` detects as SD1.5 (built with ComfyUI's own classes in a subprocess).
* ``harness_server``: ``ComfyServer``, a ``main.py --cpu`` server in a throw-away base directory
  with this repository linked in as a custom node; it never writes into the ComfyUI tree.
  (The real-server tests share one per tree: the ``server`` fixture of tests/comfy/server.)
* ``harness_http`` / ``harness_events``: the HTTP + websocket protocol (``queue_prompt``,
  ``wait_for``, ``interrupt``).
* ``harness_browser``: the real frontend in headless Chromium.
* ``harness_workflow``: ``workflow_to_api_prompt`` / ``override_inputs`` turn a UI-format
  workflow (what ``example_workflows/*.json`` hold) into the API prompt the frontend would queue.

Every part imports only the standard library at import time, so collecting tests on a machine
without ComfyUI, torch or a websocket client costs nothing.
"""
from __future__ import annotations

from harness_browser import (CHROMIUM_ARGS, PAGE_TIMEOUT_MS, chromium_path, headless_chromium,  # noqa: F401
                             load_template, open_comfy_page, queue_from_page, require_browser,
                             set_page_widgets)
from harness_events import (TERMINAL_EVENTS, EventListener, PromptResult, close_listeners,  # noqa: F401
                            listener_for, queue_prompt, wait_for)
from harness_http import (PromptRejected, fetch_output_file, get_history, get_json, get_object_info,  # noqa: F401
                          http_json, interrupt)
from harness_server import ComfyServer, comfy_test_server, free_port, package_overlay_for  # noqa: F401
from harness_tiny_sd15 import (SD_VAE_DDCONFIG, TINY_SD15_BUILDER_VERSION, TINY_SD15_FILENAME,  # noqa: F401
                               TINY_SD15_UNET_CONFIG, build_tiny_sd15_checkpoint, cached_tiny_sd15_checkpoint,
                               checkpoint_state_dict, import_comfy_cpu, reset_all_parameters,
                               write_fp16_checkpoint)
from harness_trees import (NON_ESSENTIAL_MARKER, NOT_REQUIRED_DISTRIBUTIONS, PACKAGE_LINK_NAME,  # noqa: F401
                           REPO_ROOT, ComfyTree, comfyui_missing_reason, comfyui_version, find_comfyui_root,
                           find_comfyui_trees, missing_requirements, package_import_failures,
                           require_comfyui_root, require_runnable_comfyui, tree_ids, workflow_files)
from harness_workflow import (MODE_ALWAYS, MODE_BYPASS, MODE_NEVER, TINY_IMAGE_SIZE, TINY_TRAINING,  # noqa: F401
                              UPLOAD_OPTIONS, VIRTUAL_NODE_TYPES, WIDGET_TYPES, UiWorkflowBuilder,
                              WorkflowConversionError, core_ui_workflow, nodes_of_type, override_inputs,
                              workflow_to_api_prompt)
