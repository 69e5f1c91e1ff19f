"""Installing the way ComfyUI-Manager does, offline, in a real server of each ComfyUI tree.

The Manager clones the repository into custom_nodes/, runs `pip install -r requirements.txt`,
then `install.py` if there is one, and restarts ComfyUI. Here: the repository's files as a
clone of this working tree holds them (tracked and not-ignored files, no symlink to the
checkout) go into a fresh custom_nodes/ of a throw-away base directory; the requirements must
be satisfied in this environment (pip resolves them offline and would change nothing); the
server starts and lists the nodes, with no "IMPORT FAILED". Then the same with `peft` made
unimportable (tests/support/hidden_packages.py): one log line names it and the command that installs it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

import comfy_harness as harness
import hidden_packages

PRDP_NODES = ("PRDPLoadRewardModel", "PRDPTrainLoRA", "PRDPApplyLoRA", "PRDPScoreImages")
MISSING_MARKER = "comfyui-prdp: missing Python package"


def clone_into_custom_nodes(workdir) -> "os.PathLike":
    """Copy the files a clone of this working tree would hold to workdir/base/custom_nodes/."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=harness.REPO_ROOT, capture_output=True, check=True).stdout
    target = workdir / "base" / "custom_nodes" / harness.PACKAGE_LINK_NAME
    for relative in filter(None, listed.decode().split("\0")):
        source = harness.REPO_ROOT / relative
        if source.is_file():  # files deleted in the working tree are still listed by git
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / relative)
    return target


def manager_install_steps(package) -> list[str]:
    """What the Manager would run after cloning, checked offline: pip must find every
    requirement satisfied (and install nothing); install.py, if shipped, must succeed."""
    requirements = package / "requirements.txt"
    assert requirements.is_file(), "no requirements.txt: the Manager would install no dependency"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
                          "--disable-pip-version-check", "-r", str(requirements)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    assert "Would install" not in pip.stdout, pip.stdout[-3000:]
    steps = ["pip install -r requirements.txt: all satisfied"]
    if (package / "install.py").is_file():
        run = subprocess.run([sys.executable, "install.py"], cwd=package, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        steps.append("install.py")
    return steps


def _start(tmp_path_factory, tree, name, env=None):
    root = harness.require_runnable_comfyui(tree)
    workdir = tmp_path_factory.mktemp(f"{name}-{harness.comfyui_version(root)}")
    package = clone_into_custom_nodes(workdir)
    steps = manager_install_steps(package)
    server = harness.ComfyServer(workdir, root, package_dir=package, env=env)
    return server.start(), package, steps


@pytest.fixture(scope="module")
def installed(tmp_path_factory, comfyui_tree):
    server, package, steps = _start(tmp_path_factory, comfyui_tree, "manager")
    try:
        yield server, package, steps
    finally:
        server.stop()


@pytest.fixture(scope="module")
def without_peft(tmp_path_factory, comfyui_tree):
    root = harness.require_runnable_comfyui(comfyui_tree)
    shim = hidden_packages.write_shim(tmp_path_factory.mktemp("shim"), ["peft"])
    overlay = harness.package_overlay_for(root)
    env = {"PYTHONPATH": hidden_packages.env_with_shim(shim, {}, *filter(None, [overlay]))["PYTHONPATH"]}
    server, package, _ = _start(tmp_path_factory, comfyui_tree, "manager-hidden-dependency", env=env)
    try:
        yield server, package
    finally:
        server.stop()


def _listed_nodes(server) -> list[str]:
    info = server.object_info()
    return [name for name in PRDP_NODES if name in info]


def test_manager_install_loads_the_nodes_without_import_failure(installed):
    server, package, steps = installed
    assert package.is_dir() and not package.is_symlink()
    log = server.log_text()
    assert not harness.package_import_failures(log), log[-12000:]
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and str(package) in line], log[-12000:]
    imported = [line for line in log.splitlines() if "seconds" in line and line.rstrip().endswith(str(package))]
    assert imported, f"ComfyUI did not import {package} (steps run: {steps}):\n{log[-12000:]}"
    assert MISSING_MARKER not in log, log[-12000:]
    assert _listed_nodes(server) == list(PRDP_NODES), server.log_tail(8000)


def test_a_missing_dependency_is_one_clear_log_line(without_peft):
    server, package = without_peft
    log = server.log_text()
    named = [line for line in log.splitlines() if re.search(r"\bpeft\b", line)]
    assert len(named) == 1, "\n".join(named) or log[-12000:]
    line = named[0]
    assert f"{MISSING_MARKER} peft (not installed)" in line, line   # 0.33 puts its "[ERROR]" before it
    assert f'-m pip install -r "{package / "requirements.txt"}"' in line, line
    ours = [chunk for chunk in log.split("Traceback")[1:] if str(package) in chunk]
    assert not ours, "a traceback from the package:\n" + ours[0][:4000]
    # the nodes need peft only for the command line's diffusers backend: they still load
    assert not harness.package_import_failures(log), log[-12000:]
    assert _listed_nodes(server) == list(PRDP_NODES), server.log_tail(8000)
