"""The reward factories' public face: signatures, options reaching the reward, errors.

The option handling lives in one place (loading.reward_factory / RewardOptions); these tests pin
what every factory must still look like from outside (the Load Reward node reads the
signatures) and that each shared option really arrives where it acts.
"""
from __future__ import annotations

import inspect

import pytest
import torch

import reward_fixtures as F
from comfyui_prdp.rewards import RewardModelNotFoundError, create_reward, registered_factory
from comfyui_prdp.rewards.loading import RewardOptions, reward_factory

SHARED = [("model_dir", None), ("allow_download", None), ("device", None), ("dtype", None),
          ("batch_size", 16)]
# name -> the factory's own parameters after `path` (name, default), before the shared ones
OWN = {
    "aesthetic": [("clip_path", None)],
    "clipscore": [("arch", None)],
    "hpsv2": [("arch", "ViT-H-14")],
    "hpsv2.1": [("arch", "ViT-H-14")],
    "imagereward": [("tokenizer_path", None)],
    "pickscore": [],
}


@pytest.mark.parametrize("name", sorted(OWN))
def test_factory_signature_is_unchanged(name):
    parameters = list(inspect.signature(registered_factory(name)).parameters.values())
    got = [(p.name, p.kind, p.default) for p in parameters]
    keyword = inspect.Parameter.KEYWORD_ONLY
    expected = ([("path", inspect.Parameter.POSITIONAL_OR_KEYWORD, None)]
                + [(n, keyword, d) for n, d in OWN[name] + SHARED])
    assert got == expected


def test_unknown_option_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="weights_dir"):
        create_reward("pickscore", weights_dir="/tmp")


def test_shared_options_reach_the_reward():
    folder = F.reward_model_dir()
    reward = create_reward("pickscore", model_dir=folder, allow_download=False, device="cpu",
                           dtype="bf16", batch_size=3)
    assert (reward.device, reward.dtype, reward.batch_size) == (torch.device("cpu"), torch.bfloat16, 3)
    hps = registered_factory("hpsv2.1")(str(folder / "HPS_v2.1_compressed.pt"), arch=F.TINY_OPEN_CLIP,
                               device="cpu", batch_size=2)
    assert (hps.name, hps.batch_size, hps.dtype) == ("hpsv2.1", 2, torch.float32)
    with pytest.raises(ValueError, match="batch_size=0"):
        create_reward("pickscore", model_dir=folder, allow_download=False, batch_size=0)


def test_each_path_option_is_resolved_with_model_dir(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    folder = F.reward_model_dir()
    vocabulary = F.copy_of("bert-base-uncased", tmp_path)
    reward = create_reward("imagereward", model_dir=folder, tokenizer_path=str(vocabulary),
                           allow_download=False, device="cpu")
    assert reward.name == "imagereward"
    with pytest.raises(RewardModelNotFoundError, match="no-such-vocab"):
        create_reward("imagereward", model_dir=folder, tokenizer_path="no-such-vocab",
                      allow_download=False, device="cpu")
    F.copy_of("sac+logos+ava1-l14-linearMSE.pth", tmp_path)  # the head is found, the CLIP is not
    with pytest.raises(RewardModelNotFoundError, match="clip-vit-large-patch14"):
        create_reward("aesthetic", model_dir=tmp_path, allow_download=False)


def test_clipscore_open_clip_weights_are_never_downloaded(tmp_path, monkeypatch):
    """With arch= the weight file has no known source: looked up locally even when downloads
    are allowed (HF_HUB_OFFLINE is set in tests, so the spy is what can see this)."""
    with pytest.raises(ValueError, match="needs path="):
        create_reward("clipscore", arch=F.TINY_OPEN_CLIP)
    seen = []
    original = RewardOptions.locate

    def spy(self, files, path=None, *, local_only=False):
        seen.append((files.label, self.allow_download, local_only))
        return original(self, files, path, local_only=local_only)

    monkeypatch.setattr(RewardOptions, "locate", spy)
    with pytest.raises(RewardModelNotFoundError):
        create_reward("clipscore", path=str(tmp_path / "missing.pt"), arch=F.TINY_OPEN_CLIP,
                      allow_download=True)
    assert seen == [(f"open_clip {F.TINY_OPEN_CLIP} weights", True, True)]


def test_reward_factory_needs_an_options_parameter():
    def build(path=None):
        return path

    with pytest.raises(TypeError, match="options"):
        reward_factory(build)


def test_reward_factory_passes_own_and_shared_options():
    @reward_factory
    def create_probe(path=None, *, extra: int = 1, options: RewardOptions):
        """A probe."""
        return path, extra, options

    assert create_probe.__name__ == "create_probe" and create_probe.__doc__ == "A probe."
    path, extra, options = create_probe("p", extra=2, dtype="fp16", model_dir=["a"])
    assert (path, extra) == ("p", 2)
    assert options == RewardOptions(model_dir=["a"], dtype="fp16")
    assert options.scoring == {"device": None, "dtype": "fp16", "batch_size": 16}
    with pytest.raises(TypeError):
        create_probe("p", "positional-extra")
