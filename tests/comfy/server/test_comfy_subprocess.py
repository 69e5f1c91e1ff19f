"""ComfyUI's own code run on this package in a subprocess, no server: its prompt validation
(execution.validate_prompt) of a refused Train LoRA form, and its folder_paths with an
extra_model_paths.yaml finding a reward model. Skipped without a ComfyUI tree.

(Moved from tests/unit/test_nodes_validate.py and test_rewards_loading.py, so the unit tier never
touches ComfyUI.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import reward_fixtures as F
from comfy_inprocess import REPO_ROOT
from test_nodes_validate import GOOD


def _comfy_roots():
    from comfy_inprocess import comfyui_root

    candidates = (comfyui_root(), Path.home() / "ComfyUI-0.33")
    roots = [root for root in candidates if root and (root / "execution.py").is_file()]
    return list(dict.fromkeys(roots))


@pytest.mark.parametrize("root", _comfy_roots() or [pytest.param(None, marks=pytest.mark.skip("no ComfyUI tree"))],
                         ids=lambda root: root.name if root else "none")
def test_comfyui_reports_a_refused_form_once_with_every_problem(root, tmp_path):
    """Through ComfyUI's own validate_prompt: a good form passes; a bad one gives ONE error entry on
    the node listing all its problems (a returned message would be repeated under every input)."""
    (tmp_path / "tiny.safetensors").write_bytes(b"")
    good = {k: v for k, v in GOOD.items()}
    bad = {**GOOD, "epochs": "abc", "learning_rate": "inf", "width": 8, "lora_name": "x\n", "seed": -1}
    out = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "support" / "comfy_validate_prompt.py"), str(root),
                          str(REPO_ROOT), str(tmp_path)], input=json.dumps([good, bad]), capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    passed, refused = json.loads(lines[0][len("RESULT "):])
    assert passed == {"valid": True, "node_errors": {}}, passed
    assert not refused["valid"] and list(refused["node_errors"]) == ["3"], refused
    errors = refused["node_errors"]["3"]["errors"]
    assert len(errors) == 1, [e["details"] for e in errors]
    for fragment in ("epochs='abc'", "learning_rate=inf", "width=8", "lora_name='x\\n'", "seed=-1"):
        assert errors[0]["details"].count(fragment) == 1, errors[0]["details"]


@pytest.mark.skipif(not (Path.home() / "ComfyUI" / "folder_paths.py").exists(), reason="no ComfyUI tree")
def test_real_comfyui_folder_paths_and_extra_model_paths_yaml(tmp_path):
    """In a subprocess: ComfyUI's own folder_paths + extra_model_paths.yaml loader."""
    extra = tmp_path / "shared_models" / "rewards"
    extra.mkdir(parents=True)
    F.copy_of("HPS_v2.1_compressed.pt", extra)
    yaml_file = tmp_path / "extra_model_paths.yaml"
    yaml_file.write_text(f"shared:\n  base_path: {tmp_path / 'shared_models'}\n  reward_models: rewards\n")
    script = textwrap.dedent(f"""
        import sys, os
        sys.argv = ["main.py"]
        sys.path.insert(0, {str(Path.home() / 'ComfyUI')!r})
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import folder_paths
        from utils.extra_config import load_extra_path_config
        load_extra_path_config({str(yaml_file)!r})
        import comfyui_prdp.rewards  # registers models/reward_models on import inside ComfyUI
        from comfyui_prdp.rewards.hps import HPS_FILES
        from comfyui_prdp.rewards.model_files import resolve_model_path
        paths = folder_paths.get_folder_paths("reward_models")
        assert paths[0] == os.path.join(folder_paths.models_dir, "reward_models"), paths
        assert {str(extra)!r} in paths, paths
        found = resolve_model_path(HPS_FILES["hpsv2.1"], allow_download=False)
        assert str(found) == {str((extra / 'HPS_v2.1_compressed.pt').resolve())!r}, found
        print("OK", "HPS_v2.1_compressed.pt" in folder_paths.get_filename_list("reward_models"))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK True" in result.stdout
