"""Shared pytest setup: the repo root and tests/ are importable; tests run on the CPU.

``comfyui_tree`` is the ComfyUI source tree a real-server test runs against, one module-scoped
parameter per tree of ``comfy_harness.find_comfyui_trees()`` (COMFYUI_ROOTS, else COMFYUI_ROOT,
else ~/ComfyUI), with test ids naming its version (``[comfyui-0.3.64]``); a missing tree is a
parameter skipped with the reason. pytest runs a module's tests tree by tree, so one server is
up at a time.

Tests that import ComfyUI into this process get the ``comfy_inprocess`` marker (see
comfy_inprocess.py): those of a module holding ComfyUI's ``comfy`` package in its namespace,
besides any marked by hand.
"""
import os
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import comfy_harness  # noqa: E402  (needs tests/ on sys.path)

INPROCESS_MARK = "comfy_inprocess"


def _tree_params():
    trees = comfy_harness.find_comfyui_trees()
    return [pytest.param(tree, id=name, marks=() if tree.root else pytest.mark.skip(reason=tree.problem))
            for tree, name in zip(trees, comfy_harness.tree_ids(trees))]


@pytest.fixture(scope="module", params=_tree_params())
def comfyui_tree(request) -> "comfy_harness.ComfyTree":
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", f"{INPROCESS_MARK}: imports ComfyUI into the pytest process "
                                       "(runs against one tree per process)")


def _holds_comfy(module) -> bool:
    return any(isinstance(value, types.ModuleType) and value.__name__.split(".")[0] == "comfy"
               for value in vars(module).values())


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and _holds_comfy(module):
            item.add_marker(INPROCESS_MARK)


def pytest_report_header(config):
    trees = comfy_harness.find_comfyui_trees()
    listed = ", ".join(f"{name} ({tree.root})" if tree.root else f"{name} ({tree.problem})"
                       for tree, name in zip(trees, comfy_harness.tree_ids(trees)))
    first = next((f"{name}" for tree, name in zip(trees, comfy_harness.tree_ids(trees)) if tree.root), "none")
    return [f"ComfyUI trees for server tests: {listed}", f"ComfyUI tree for in-process tests: {first}"]
