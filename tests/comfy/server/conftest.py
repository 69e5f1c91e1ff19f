"""The real-server tier: one ComfyUI server per tree for the whole tier.

``server`` is a started ``ComfyServer`` (tests/support/harness_server.py) of ``comfyui_tree``
with the tiny SD1.5 checkpoint (built once per session and ComfyUI version), shared by every
module here; pytest runs one tree's tests before the next tree's, so one shared server is up at
a time. A module that changes the server's state for its own tests puts it back (the dashboard
restores the user settings it sets). Modules needing a differently started server (the Manager
install: another package folder, a hidden package) start their own.

``browser_ready`` skips a browser test, before anything starts, when Chromium or the playwright
package is missing; ``object_info`` is read once per module (a module may add checkpoints).
"""
import os

import pytest

import comfy_harness as harness


@pytest.fixture(scope="session")
def server(tmp_path_factory, comfyui_tree):
    with harness.comfy_test_server(tmp_path_factory, "comfy", tree=comfyui_tree) as comfy:
        yield comfy


@pytest.fixture(scope="session")
def browser_ready():
    harness.require_browser()


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


@pytest.fixture(scope="module")
def user_settings_restored(server):
    """The shared server's user settings put back as they were before the module that uses this
    (browser modules set Nodes 2.0 and the missing-models warning); ComfyUI reads the settings
    file on every request."""
    settings = server.user_dir / "default" / "comfy.settings.json"
    before = settings.read_bytes()
    yield
    restored = settings.with_name(settings.name + ".restoring")
    restored.write_bytes(before)
    os.replace(restored, settings)
