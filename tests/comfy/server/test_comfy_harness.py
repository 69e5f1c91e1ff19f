"""The test harness itself, without ComfyUI: which trees the ComfyUI tests run against (and
their ids), the checkpoint builder on both `state_dict_for_saving` signatures, the package
overlay a tree's server gets, and a ComfyUI test module skipping cleanly on a machine without
ComfyUI (the fresh-clone failure of issue 7.1)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import comfy_harness as harness

SUPPORT_DIR = Path(__file__).resolve().parents[2] / "support"


def fake_tree(folder: Path, version: str | None) -> Path:
    (folder / "comfy").mkdir(parents=True)
    (folder / "main.py").write_text("")
    (folder / "folder_paths.py").write_text("")
    if version:
        (folder / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    return folder


@pytest.fixture()
def no_comfy_env(monkeypatch, tmp_path):
    """No ComfyUI in the environment and an empty HOME."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("COMFYUI_ROOT", raising=False)
    monkeypatch.delenv("COMFYUI_ROOTS", raising=False)
    return home


def test_comfyui_roots_lists_every_tree_in_order_with_version_ids(no_comfy_env, tmp_path, monkeypatch):
    old = fake_tree(tmp_path / "old", "0.3.64")
    new = fake_tree(tmp_path / "new", "0.33.0")
    monkeypatch.setenv("COMFYUI_ROOT", str(old))  # COMFYUI_ROOTS wins over it
    monkeypatch.setenv("COMFYUI_ROOTS", f"{new}:{tmp_path / 'nowhere'}::{old}:{new}/../new")
    trees = harness.find_comfyui_trees()
    assert [t.root for t in trees] == [new.resolve(), None, old.resolve()]
    assert "nowhere is not a ComfyUI source tree" in trees[1].problem
    assert harness.tree_ids(trees) == ["comfyui-0.33.0", "no-comfyui", "comfyui-0.3.64"]
    assert harness.find_comfyui_root() == new.resolve()


def test_comfyui_root_then_home_then_a_clear_reason(no_comfy_env, tmp_path, monkeypatch):
    trees = harness.find_comfyui_trees()
    assert len(trees) == 1 and trees[0].root is None
    assert "COMFYUI_ROOTS" in trees[0].problem and "~/ComfyUI" in trees[0].problem
    home_tree = fake_tree(no_comfy_env / "ComfyUI", None)
    assert [t.root for t in harness.find_comfyui_trees()] == [home_tree.resolve()]
    assert harness.tree_ids(harness.find_comfyui_trees()) == ["comfyui-unknown"]
    monkeypatch.setenv("COMFYUI_ROOT", str(tmp_path / "wrong"))  # set but wrong: never replaced by ~/ComfyUI
    trees = harness.find_comfyui_trees()
    assert trees[0].root is None and "wrong is not a ComfyUI source tree" in trees[0].problem


def test_tree_ids_stay_unique_for_repeated_versions(tmp_path):
    trees = [harness.ComfyTree(str(p), fake_tree(p, "1.0.0")) for p in (tmp_path / "a", tmp_path / "b")]
    assert harness.tree_ids(trees) == ["comfyui-1.0.0", "comfyui-1.0.0-2"]


class _FakeUnet:
    def state_dict(self):
        return {"unet": 1}


class _BeforeFeb2026:
    diffusion_model = _FakeUnet()

    def state_dict_for_saving(self, clip_state_dict=None, vae_state_dict=None, clip_vision_state_dict=None):
        return {"unet": self.diffusion_model.state_dict(), "clip": clip_state_dict, "vae": vae_state_dict}


class _SinceFeb2026:
    diffusion_model = _FakeUnet()

    def state_dict_for_saving(self, unet_state_dict, clip_state_dict=None, vae_state_dict=None,
                              clip_vision_state_dict=None):
        return {"unet": unet_state_dict, "clip": clip_state_dict, "vae": vae_state_dict}


@pytest.mark.parametrize("model", [_BeforeFeb2026(), _SinceFeb2026()], ids=["before-2026-02", "since-2026-02"])
def test_checkpoint_state_dict_puts_each_part_in_its_place(model):
    saved = harness.checkpoint_state_dict(model, {"clip": 2}, {"vae": 3})
    assert saved == {"unet": {"unet": 1}, "clip": {"clip": 2}, "vae": {"vae": 3}}


def test_checkpoint_state_dict_names_an_unknown_signature():
    class Renamed:
        diffusion_model = _FakeUnet()

        def state_dict_for_saving(self, unet_state_dict, text_encoder_sd=None, vae_state_dict=None):
            raise AssertionError("must not be called")

    with pytest.raises(TypeError, match="clip_state_dict"):
        harness.checkpoint_state_dict(Renamed(), {}, {})


def test_package_overlay_is_found_by_the_tree_version(tmp_path):
    tree = fake_tree(tmp_path / "tree", "0.3.64")
    env = tmp_path / "venv"
    (env / "bin").mkdir(parents=True)
    python = env / "bin" / "python"
    python.write_text("")
    assert harness.package_overlay_for(tree, str(python)) is None
    overlay = env / "comfyui-overlays" / "0.3.64"
    overlay.mkdir(parents=True)
    assert harness.package_overlay_for(tree, str(python)) is None  # half-unpacked: no PINS yet
    (overlay / "PINS").write_text("comfyui-frontend-package==1.27.10\n")
    assert harness.package_overlay_for(tree, str(python)) == overlay


def test_comfyui_trees_script_finds_home_trees_unless_told(tmp_path):
    home = tmp_path / "home"
    fake_tree(home / "ComfyUI", "0.3.64")
    fake_tree(home / "ComfyUI-0.33", "0.33.0")
    (home / "ComfyUI-notes").mkdir()
    script = harness.REPO_ROOT / "scripts" / "comfyui_trees.sh"
    base = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_ROOT", "COMFYUI_ROOTS")}

    def run(**env):
        return subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True,
                              env={**base, "HOME": str(home), **env}).stdout.strip()

    assert run() == f"{home}/ComfyUI:{home}/ComfyUI-0.33"
    assert run(COMFYUI_ROOT="/x") == "/x"
    assert run(COMFYUI_ROOTS="/a:/b", COMFYUI_ROOT="/x") == "/a:/b"
    assert run(HOME=str(tmp_path)) == ""


def test_an_in_process_module_skips_cleanly_without_comfyui(tmp_path):
    """A module calling import_comfy() at import time is skipped whole with the reason; it
    used to end pytest with a collection error (exit 2) on a machine without ComfyUI."""
    home = tmp_path / "home"
    home.mkdir()
    test_file = tmp_path / "test_needs_comfy.py"
    test_file.write_text(textwrap.dedent("""
        from comfy_inprocess import import_comfy
        import_comfy()

        def test_never_runs():
            raise AssertionError("ran without ComfyUI")
    """))
    # a skipped module alone collects nothing (exit 5), so a plain test keeps the run meaningful
    (tmp_path / "test_plain.py").write_text("def test_plain():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_ROOT", "COMFYUI_ROOTS")}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join([str(SUPPORT_DIR), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 1 skipped" in proc.stdout and "no ComfyUI found" in proc.stdout, proc.stdout
