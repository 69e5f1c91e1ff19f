"""Are the Python packages of requirements.txt installed? One line for ComfyUI's log when not.

ComfyUI-Manager installs a custom node with ``pip install -r requirements.txt``; a manual
``git clone`` into custom_nodes does not, and then the first missing package would surface as
a traceback somewhere in a node. The package's entry point (the repository's __init__.py)
calls ``missing_dependencies_line()`` instead and logs its one line, naming every missing or
too old package and the command that installs them. Standard library only (it runs before
anything else of the package is imported); versions are checked when ``packaging`` is there.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "requirements.txt"
#: distribution name -> the module it provides, where they differ
IMPORT_NAMES = {"pillow": "PIL", "open-clip-torch": "open_clip"}
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;#]*)")


def canonical_name(name: str) -> str:
    """PEP 503 form: 'Open_Clip.Torch' -> 'open-clip-torch'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path = REQUIREMENTS_FILE) -> List[Tuple[str, str]]:
    """(distribution name, version specifier) of each requirement line; [] without the file."""
    if not path.is_file():
        return []
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        match = _REQUIREMENT.match(line) if line and not line.startswith("-") else None
        if match:
            found.append((match.group(1), match.group(3).strip()))
    return found


def module_name(distribution: str) -> str:
    canonical = canonical_name(distribution)
    return IMPORT_NAMES.get(canonical, canonical.replace("-", "_"))


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _too_old(installed: str, specifier: str) -> bool:
    """Whether `installed` breaks `specifier` (False when packaging cannot tell)."""
    if not specifier:
        return False
    try:
        from packaging.specifiers import InvalidSpecifier, SpecifierSet
        from packaging.version import InvalidVersion
    except ImportError:
        return False
    try:
        return not SpecifierSet(specifier).contains(installed, prereleases=True)
    except (InvalidSpecifier, InvalidVersion, TypeError):
        return False


def unmet_requirements(requirements: Sequence[Tuple[str, str]]) -> List[str]:
    """'peft (not installed)' / 'diffusers 0.20.0 (needs >=0.33)' for each unmet requirement."""
    unmet = []
    for distribution, specifier in requirements:
        if not _importable(module_name(distribution)):
            unmet.append(f"{distribution} (not installed)")
            continue
        try:
            installed = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue  # importable without metadata (vendored, editable): accept it
        if not isinstance(installed, str):
            continue  # a broken dist-info without a version: nothing to compare
        if _too_old(installed, specifier):
            unmet.append(f"{distribution} {installed} (needs {specifier})")
    return unmet


def install_command(requirements_file: Path = REQUIREMENTS_FILE, python: Optional[str] = None) -> str:
    return f'"{python or sys.executable}" -m pip install -r "{requirements_file}"'


def missing_dependencies_line(requirements_file: Path = REQUIREMENTS_FILE,
                              python: Optional[str] = None) -> Optional[str]:
    """The one log line naming every unmet requirement and the fix; None when all are met."""
    unmet = unmet_requirements(read_requirements(requirements_file))
    if not unmet:
        return None
    return (f"comfyui-prdp: missing Python package{'s' if len(unmet) > 1 else ''} {', '.join(unmet)}. "
            f"Install into ComfyUI's Python: {install_command(requirements_file, python)}, then restart ComfyUI.")


def module_missing_message(error: ModuleNotFoundError) -> str:
    """A node's message for a package that could not be imported while it ran."""
    return (f"comfyui-prdp needs the Python package {error.name or 'named above'}, which is not installed "
            f"({error}). Install into ComfyUI's Python: {install_command()}, then restart ComfyUI.")
