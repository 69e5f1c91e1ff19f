"""Missing reward weights, as a person meets them in ComfyUI (issue 22, section 3).

ComfyUI shows a node's error as "<exception type with its module path>: <message>", so the
Load Reward node raises built-in types (the message comes first); its advice names the node's
widget `weights`, not the Python API's `path=`; a weighted mix names every missing part at once.
Offline: reward-model folders and the Hugging Face cache are empty temporary folders.
"""
from __future__ import annotations

import pytest

from comfy_inprocess import load_plugin_package
from comfyui_prdp.rewards import RewardModelNotFoundError, create_reward
from comfyui_prdp.rewards.model_files import ENV_MODEL_DIRS

PAPER_MIX = "pickscore:10, hpsv2:2, aesthetic:0.05"


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    from huggingface_hub import constants

    (tmp_path / "hf-cache").mkdir()
    (tmp_path / "reward_models").mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv(ENV_MODEL_DIRS, str(tmp_path / "reward_models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "reward_models"


def _node():
    return load_plugin_package().NODE_CLASS_MAPPINGS["PRDPLoadRewardModel"]()


def _load_error(reward: str, components: str = PAPER_MIX) -> BaseException:
    with pytest.raises(Exception) as raised:
        _node().load(reward, "(auto)", "cpu", "auto", components=components, allow_download=False)
    return raised.value


def test_node_names_its_weights_widget_and_raises_a_builtin_type(no_weights_anywhere):
    error = _load_error("pickscore")
    assert type(error).__module__ == "builtins", f"ComfyUI would show {type(error).__module__}.{type(error).__name__}"
    assert isinstance(error, FileNotFoundError)
    message = str(error)
    assert message.startswith("PickScore"), message
    assert "`weights` widget" in message and "path=" not in message, message
    assert str(no_weights_anywhere) in message  # where to put the file


def test_node_weighted_mix_names_every_missing_part_at_once(no_weights_anywhere):
    error = _load_error("weighted")
    assert type(error).__module__ == "builtins"
    message = str(error)
    first_line = message.splitlines()[0]
    assert "3 of its 3 parts" in first_line and all(name in first_line for name in ("pickscore", "hpsv2", "aesthetic")), message
    for name in ("pickscore", "hpsv2", "aesthetic"):
        assert f"[{name}] " in message, message
    # the mix's files come from the folders, never from the `weights` widget
    assert "`weights` widget" not in message and "path=" not in message, message


def test_library_weighted_mix_names_every_missing_part(no_weights_anywhere):
    with pytest.raises(RewardModelNotFoundError) as raised:
        create_reward("weighted", components="jpeg-compressibility:1, pickscore:10, aesthetic:0.05",
                      allow_download=False)
    message = str(raised.value)
    assert "2 of its 3 parts" in message and "[pickscore] " in message and "[aesthetic] " in message, message
    assert "jpeg" not in message
    assert message.count("or pass path=") == 2, message  # the Python API's own advice, once per part
