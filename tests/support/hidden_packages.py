"""Make installed packages look not installed to a child Python (a missing-dependency test).

``write_shim(folder, ["peft"])`` writes ``folder/sitecustomize.py``; a Python started with
``folder`` first on PYTHONPATH then neither imports ``peft`` (ModuleNotFoundError) nor finds
its distribution metadata, exactly as when it was never installed. Every import finder is
wrapped, nothing is deleted.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

SHIM = '''\
"""Test shim (tests/support/hidden_packages.py): these packages look not installed: {hidden}."""
import re as _re
import sys as _sys

_HIDDEN = {hidden}


def _canonical(name):
    return _re.sub(r"[-_.]+", "-", name or "").lower()


class _Hiding:
    def __init__(self, inner):
        self._inner = inner

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in _HIDDEN:
            return None
        find = getattr(self._inner, "find_spec", None)
        return find(fullname, path, target) if find else None

    def find_distributions(self, *args, **kwargs):
        find = getattr(self._inner, "find_distributions", None)
        for dist in (find(*args, **kwargs) if find else ()):
            if _canonical(dist.metadata["Name"]) not in {{_canonical(n) for n in _HIDDEN}}:
                yield dist

    def __getattr__(self, name):
        return getattr(self._inner, name)


_sys.meta_path[:] = [_Hiding(finder) for finder in _sys.meta_path]
for _name in list(_sys.modules):
    if _name.split(".")[0] in _HIDDEN:
        del _sys.modules[_name]
'''


def write_shim(folder: Path, hidden: Iterable[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sitecustomize.py"
    path.write_text(SHIM.format(hidden=repr(sorted(set(hidden)))))
    return folder


def env_with_shim(folder: Path, base: Mapping[str, str] | None = None, *extra_paths: Path) -> dict:
    """``base`` (default os.environ) with ``folder`` then ``extra_paths`` first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    parts = [str(folder), *map(str, extra_paths), *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env
