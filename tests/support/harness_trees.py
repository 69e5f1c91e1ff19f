"""Which ComfyUI source trees the tests run against, and whether a tree can run here.

``find_comfyui_trees``: env COMFYUI_ROOTS (colon-separated), else COMFYUI_ROOT, else the ComfyUI
whose custom_nodes/ holds this repository, else ~/ComfyUI; each tree with its version
(tests/comfy/server/conftest.py parametrises the real-server tests over them). ``require_runnable_comfyui``
skips the calling test with the reason when a tree is unusable or its requirements are missing.
Standard library only, so collecting tests costs nothing without ComfyUI.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_LINK_NAME = "comfyui-prdp"


def workflow_files() -> list[Path]:
    """The shipped example workflows: ``example_workflows/`` (what ComfyUI's template browser
    reads), else the legacy ``workflows/``."""
    for name in ("example_workflows", "workflows"):
        files = sorted((REPO_ROOT / name).glob("*.json"))
        if files:
            return files
    return []


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
