"""requirements.txt, what ComfyUI-Manager installs (`pip install -r requirements.txt`): in step
with pyproject.toml, without torch, satisfied by this environment; and a package that is not
installed is named in one line by the package's entry point (comfyui_prdp/dependencies.py).
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import hidden_packages
from comfyui_prdp import dependencies

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "requirements.txt"
TORCH_BUILDS = {"torch", "torchvision", "torchaudio"}


def _requirement_lines(path: Path) -> list[str]:
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]


def _by_name(requirements) -> dict:
    parsed = [Requirement(text) for text in requirements]
    return {canonicalize_name(r.name): (str(r.specifier), str(r.marker or ""), sorted(r.extras)) for r in parsed}


def _pyproject_dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_requirements_txt_matches_pyproject_dependencies():
    assert REQUIREMENTS.is_file(), "no requirements.txt: ComfyUI-Manager would install none of the dependencies"
    in_txt, in_pyproject = _by_name(_requirement_lines(REQUIREMENTS)), _by_name(_pyproject_dependencies())
    only_txt = {k: v for k, v in in_txt.items() if in_pyproject.get(k) != v}
    only_pyproject = {k: v for k, v in in_pyproject.items() if in_txt.get(k) != v}
    assert not only_txt and not only_pyproject, (
        f"requirements.txt and pyproject.toml disagree: requirements.txt has {only_txt}, "
        f"pyproject.toml has {only_pyproject}")


def test_requirements_leave_torch_to_comfyui():
    names = set(_by_name(_requirement_lines(REQUIREMENTS)))
    assert not names & TORCH_BUILDS, f"requirements.txt must not pin a torch build: {names & TORCH_BUILDS}"
    assert all(not line.startswith("-") for line in _requirement_lines(REQUIREMENTS)), \
        "no pip options (--index-url, -e ...) in requirements.txt"


def test_this_environment_satisfies_every_requirement():
    unmet = []
    for text in _requirement_lines(REQUIREMENTS):
        requirement = Requirement(text)
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(f"{requirement.name}: not installed")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            unmet.append(f"{requirement.name} {installed} not in {requirement.specifier}")
    assert not unmet, unmet


def test_pip_install_of_requirements_would_change_nothing_here():
    """What the Manager runs, resolved offline (--no-index) against this environment: every
    requirement and its dependencies are already satisfied, so nothing (torch included) would
    be installed, upgraded or downgraded."""
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
                           "--disable-pip-version-check", "-r", str(REQUIREMENTS)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Would install" not in proc.stdout, proc.stdout[-3000:]


def test_dependency_check_reads_the_shipped_requirements():
    assert dependencies.REQUIREMENTS_FILE == REQUIREMENTS
    read = {canonicalize_name(name) for name, _ in dependencies.read_requirements()}
    assert read == set(_by_name(_requirement_lines(REQUIREMENTS)))
    assert dependencies.missing_dependencies_line() is None, dependencies.missing_dependencies_line()


def test_missing_and_too_old_packages_are_named_in_one_line(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nsurely-not-installed-prdp-probe>=1.0\npip>=9999\nnumpy\n")
    line = dependencies.missing_dependencies_line(requirements, python="/opt/py/bin/python")
    assert line is not None and "\n" not in line
    assert "surely-not-installed-prdp-probe (not installed)" in line
    assert f"pip {importlib.metadata.version('pip')} (needs >=9999)" in line
    assert "numpy" not in line
    assert f'"/opt/py/bin/python" -m pip install -r "{requirements}"' in line


def test_module_names_of_distributions():
    assert dependencies.module_name("pillow") == "PIL"
    assert dependencies.module_name("open_clip_torch") == "open_clip"
    assert dependencies.module_name("huggingface_hub") == "huggingface_hub"
    for name, _ in dependencies.read_requirements():
        module = dependencies.module_name(name)
        __import__(module)  # the mapping names a module this environment really has


ENTRY_IMPORT = textwrap.dedent("""
    import importlib.util, logging, sys
    logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s", stream=sys.stdout)
    spec = importlib.util.spec_from_file_location("comfyui-prdp", sys.argv[1],
                                                  submodule_search_locations=[sys.argv[2]])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    print("NODES", sorted(module.NODE_CLASS_MAPPINGS))
""")


def test_entry_point_names_a_hidden_package_in_one_log_line(tmp_path):
    """The repository's __init__.py, imported the way ComfyUI imports a custom node, in a
    Python where peft looks not installed: one log line names it and the fix; the nodes load."""
    shim = hidden_packages.write_shim(tmp_path / "shim", ["peft"])
    proc = subprocess.run([sys.executable, "-c", ENTRY_IMPORT, str(ROOT / "__init__.py"), str(ROOT)],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                          env=hidden_packages.env_with_shim(shim))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    lines = [line for line in out.splitlines() if "peft" in line]
    assert len(lines) == 1, out[-4000:]
    assert lines[0].startswith("LOG ERROR comfyui-prdp: missing Python package peft (not installed)"), lines[0]
    assert f'-m pip install -r "{REQUIREMENTS}"' in lines[0]
    assert "Traceback" not in out, out[-4000:]
    assert "NODES ['PRDPApplyLoRA', 'PRDPHumanChoiceReward', 'PRDPLoadRewardModel', 'PRDPScoreImages', 'PRDPTrainLoRA']" in out, out[-4000:]


def test_the_shim_really_hides_the_package(tmp_path):
    shim = hidden_packages.write_shim(tmp_path / "shim", ["peft"])
    probe = ("import importlib.metadata as m, importlib.util as u\n"
             "print(u.find_spec('peft'), [d for d in m.distributions() if d.metadata['Name'] == 'peft'])\n"
             "try:\n    import peft\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env=hidden_packages.env_with_shim(shim))
    assert proc.stdout.split() == ["None", "[]", "missing", "peft"], proc.stdout + proc.stderr


def test_a_distribution_without_a_version_is_not_a_crash(monkeypatch):
    """A broken dist-info (importlib.metadata.version() gives None) must not stop ComfyUI from
    importing the package: the requirement is taken as met, not compared."""
    monkeypatch.setattr(dependencies.importlib.metadata, "version", lambda name: None)
    assert dependencies.unmet_requirements([("packaging", ">=20")]) == []
