"""The ComfyUI tiers (inprocess/, server/): which ComfyUI trees they run against.

``comfyui_tree`` is the ComfyUI source tree a real-server test runs against, one parameter per
tree of ``comfy_harness.find_comfyui_trees()`` (COMFYUI_ROOTS, else COMFYUI_ROOT, else
~/ComfyUI), with test ids naming its version (``[comfyui-0.3.64]``); a missing tree is a
parameter skipped with the reason. It is session-scoped, so pytest runs every test of one tree
before the next tree's: the tier's shared server (server/conftest.py) is up once per tree.

The in-process tests import one ComfyUI per process (tests/support/comfy_inprocess.py): the
first usable tree; scripts/test.sh runs comfy/inprocess/ again for every further tree.
"""
import pytest

import comfy_harness


def _tree_params():
    trees = comfy_harness.find_comfyui_trees()
    return [pytest.param(tree, id=name, marks=() if tree.root else pytest.mark.skip(reason=tree.problem))
            for tree, name in zip(trees, comfy_harness.tree_ids(trees))]


@pytest.fixture(scope="session", params=_tree_params())
def comfyui_tree(request) -> "comfy_harness.ComfyTree":
    return request.param


def pytest_report_header(config):
    trees = comfy_harness.find_comfyui_trees()
    listed = ", ".join(f"{name} ({tree.root})" if tree.root else f"{name} ({tree.problem})"
                       for tree, name in zip(trees, comfy_harness.tree_ids(trees)))
    first = next((f"{name}" for tree, name in zip(trees, comfy_harness.tree_ids(trees)) if tree.root), "none")
    return [f"ComfyUI trees for server tests: {listed}", f"ComfyUI tree for in-process tests: {first}"]
