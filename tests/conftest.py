"""Shared pytest setup for every tier: the repository root and tests/support/ are importable,
tests run on the CPU and offline.

The tiers are folders (tests/README.md): unit/ (the fast default of scripts/test.sh),
integration/, distributed/, comfy/inprocess/ and comfy/server/. The shared helpers live in
support/ (the ComfyUI harness, tiny models, toy backends). A few test modules reuse another
module's helpers (``from test_trainer import toy_config``), so every tier folder is importable
too; test module names stay unique across the tiers.

The repository root is also a ComfyUI custom-node package (its ``__init__.py`` registers the
nodes). pytest would collect it as a test package and import it under the checkout folder's
name, which fails when that name is not a Python identifier (``comfyui-prdp``, ``wt-tiers``):
``_RootIsNotATestPackage`` keeps it a plain directory.
"""
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TIERS = ("unit", "integration", "distributed", "comfy/inprocess", "comfy/server")

for path in (ROOT, TESTS / "support", *(TESTS / tier for tier in TIERS)):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class _RootIsNotATestPackage:
    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if path == ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    config.pluginmanager.register(_RootIsNotATestPackage(), "prdp-root-is-not-a-test-package")
