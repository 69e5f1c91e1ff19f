"""The package's layout rules (issue 23), read from the source with `ast` (nothing is imported):

- no import circle among comfyui_prdp's modules, counting imports inside functions and under
  TYPE_CHECKING, and counting the package `__init__`s an import runs (importing
  `comfyui_prdp.rewards.base` from outside `rewards/` runs `rewards/__init__.py` first);
- no module uses another module's private (`_name`) names: not `from comfyui_prdp.x import _name`,
  not `x._name` on an imported module, not `obj._name` where `_name` is defined only in other
  modules of the package;
- no backend imports the training loop (comfyui_prdp.trainer / comfyui_prdp.training);
- no module longer than MAX_LINES.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[2]
PKG = "comfyui_prdp"
MAX_LINES = 450
LOOP_MODULES = (f"{PKG}.trainer", f"{PKG}.training")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def read_package(root: Path = ROOT, pkg: str = PKG) -> Dict[str, Tuple[Path, ast.Module]]:
    """{module name: (file, syntax tree)} of every module of the package under `root`."""
    modules = {}
    for path in sorted((root / pkg).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        modules[_module_name(path, root)] = (path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return modules


def _is_package(name: str, modules) -> bool:
    return name in modules and modules[name][0].name == "__init__.py"


def _from_base(node: ast.ImportFrom, importer: str, modules) -> Optional[str]:
    """The absolute module a `from X import ...` reads from; None when outside the package."""
    if node.level == 0:
        return node.module if node.module and (node.module == PKG or node.module.startswith(PKG + ".")) else None
    package = importer if _is_package(importer, modules) else importer.rpartition(".")[0]
    parts = package.split(".")
    if node.level - 1 >= len(parts):
        return None
    base = parts[:len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(importer: str, tree: ast.Module, modules) -> List[Tuple[str, List[str], int]]:
    """(module, names imported from it, line) for every import of a package module, anywhere in the file."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PKG or alias.name.startswith(PKG + "."):
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, importer, modules)
            if base is None:
                continue
            plain = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    found.append((sub, [], node.lineno))       # `from pkg import submodule`
                else:
                    plain.append(alias.name)
            if plain or not node.names:
                found.append((base, plain, node.lineno))
    return found


def _ancestors(name: str) -> List[str]:
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def import_graph(modules) -> Dict[str, Dict[str, int]]:
    """{importer: {imported module: line}}. Importing a module runs its packages' `__init__`s
    first, so those count too, except the importer's own packages (already running)."""
    graph: Dict[str, Dict[str, int]] = {name: {} for name in modules}
    for importer, (_path, tree) in modules.items():
        own = set(_ancestors(importer)) | ({importer} if _is_package(importer, modules) else set())
        for target, _names, line in imports_of(importer, tree, modules):
            for name in _ancestors(target):
                if name in modules and name not in own:
                    graph[importer].setdefault(name, line)
            if target in modules and target != importer:        # named outright: even its own package
                graph[importer].setdefault(target, line)
    return graph


def find_cycles(graph: Dict[str, Dict[str, int]]) -> List[List[str]]:
    """One cycle (a list of modules, first == last) per strongly connected group of modules."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    groups: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:                      # Tarjan, iterative enough for ~100 modules
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:
        members = set(group)
        start = min(group)
        # shortest way back to `start` inside the group
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        cycle = paths[v] + [start]
                        break
                    if w in members and w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if cycle:
                    break
            frontier = nxt
        cycles.append(cycle)
    return cycles


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_private_names(tree: ast.Module) -> Set[str]:
    """Private names a module defines: functions, methods, classes, assigned names and `self._x`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if _private(n)}


def private_uses(modules) -> List[str]:
    """Every use of another module's private name, as 'file:line: what'."""
    defined = {name: _defined_private_names(tree) for name, (_p, tree) in modules.items()}
    elsewhere: Dict[str, Set[str]] = {}
    for name, names in defined.items():
        for n in names:
            elsewhere.setdefault(n, set()).add(name)
    problems = []
    for importer, (path, tree) in modules.items():
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        module_aliases: Dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _from_base(node, importer, modules)
                if base is None:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        module_aliases[alias.asname or alias.name] = sub
                    elif _private(alias.name) and base != importer:
                        problems.append(f"{rel}:{node.lineno}: imports private {alias.name} from {base}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(PKG + ".") and alias.asname:
                        module_aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in module_aliases:
                if module_aliases[owner.id] != importer:
                    problems.append(f"{rel}:{node.lineno}: uses {owner.id}.{node.attr}, private to "
                                    f"{module_aliases[owner.id]}")
            elif isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            elif node.attr not in defined[importer] and node.attr in elsewhere:
                problems.append(f"{rel}:{node.lineno}: uses .{node.attr}, private to "
                                f"{', '.join(sorted(elsewhere[node.attr]))}")
    return problems


def loop_imports_in_backends(modules, graph) -> List[str]:
    problems = []
    for importer, targets in graph.items():
        if not importer.startswith(f"{PKG}.backends"):
            continue
        for target, line in targets.items():
            if any(target == m or target.startswith(m + ".") for m in LOOP_MODULES):
                problems.append(f"{modules[importer][0].relative_to(ROOT)}:{line}: imports {target}")
    return problems


def long_modules(modules, limit: int = MAX_LINES) -> List[str]:
    out = []
    for _name, (path, _tree) in modules.items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit:
            out.append(f"{path.relative_to(ROOT)}: {lines} lines")
    return out


def _listing(items: Iterable[str]) -> str:
    return "\n  " + "\n  ".join(items)


MODULES = read_package()


def test_the_package_is_read():
    assert f"{PKG}.trainer" in MODULES and f"{PKG}.backends.base" in MODULES and len(MODULES) > 40


def test_no_import_cycles():
    cycles = find_cycles(import_graph(MODULES))
    assert not cycles, "import circles (break each one):" + _listing(" -> ".join(c) for c in cycles)


def test_no_module_uses_another_modules_private_names():
    problems = private_uses(MODULES)
    assert not problems, ("private names used across modules (make them public or pass what is "
                          "needed):" + _listing(problems))


def test_no_backend_imports_the_training_loop():
    problems = loop_imports_in_backends(MODULES, import_graph(MODULES))
    assert not problems, "a backend reaches up into the training loop:" + _listing(problems)


def test_no_module_is_too_long():
    offenders = long_modules(MODULES)
    assert not offenders, f"modules over {MAX_LINES} lines (split them by job):" + _listing(offenders)


def test_the_checks_catch_planted_violations(tmp_path):
    """The checks above are not vacuous: a tiny package with one of each violation fails each."""
    pkg = tmp_path / PKG
    (pkg / "backends").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from . import a\n    return a\n\ndef _hidden():\n    pass\n")
    (pkg / "c.py").write_text("from .b import _hidden\nfrom . import b\nb._hidden()\n\n"
                              "def f(obj):\n    return obj._hidden()\n")
    (pkg / "trainer.py").write_text("x = 1\n")
    (pkg / "backends" / "__init__.py").write_text("")
    (pkg / "backends" / "k.py").write_text("def f():\n    from ..trainer import x\n    return x\n")
    (pkg / "big.py").write_text("x = 1\n" * (MAX_LINES + 1))
    modules = read_package(tmp_path)
    graph = import_graph(modules)
    assert find_cycles(graph) == [[f"{PKG}.a", f"{PKG}.b", f"{PKG}.a"]]
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        uses = private_uses(modules)
        assert len(uses) == 3 and all("c.py" in u for u in uses), uses
        assert len(loop_imports_in_backends(modules, graph)) == 1
        assert long_modules(modules) == [f"{PKG}/big.py: {MAX_LINES + 1} lines"]
    finally:
        ROOT = saved


def test_an_init_that_imports_back_is_a_cycle(tmp_path):
    """rewards/__init__ -> world.rewards -> rewards.base is a circle: importing rewards.base from
    outside runs rewards/__init__ first."""
    pkg = tmp_path / PKG
    for sub in ("rewards", "world"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "rewards" / "__init__.py").write_text("from .base import x\nfrom ..world import rewards\n")
    (pkg / "rewards" / "base.py").write_text("x = 1\n")
    (pkg / "world" / "rewards.py").write_text("from ..rewards.base import x\n")
    (pkg / "world" / "__init__.py").write_text("from .grammar import y\n")       # a subpackage's module
    (pkg / "world" / "grammar.py").write_text("from .render import z\ny = 1\n")  # using its siblings: fine
    (pkg / "world" / "render.py").write_text("z = 1\n")
    (pkg / "cli").mkdir()
    (pkg / "cli" / "__init__.py").write_text("from .launch import go\n")
    (pkg / "cli" / "launch.py").write_text("def go():\n    from .. import cli\n    return cli\n")  # its package: a circle
    cycles = find_cycles(import_graph(read_package(tmp_path)))
    assert sorted(cycles) == [[f"{PKG}.cli", f"{PKG}.cli.launch", f"{PKG}.cli"],
                              [f"{PKG}.rewards", f"{PKG}.world.rewards", f"{PKG}.rewards"]], cycles
