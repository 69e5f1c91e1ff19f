"""Weighted combinations: the sum, the components, the accepted spellings, the paper helper."""
from __future__ import annotations

import pytest
import torch

import reward_fixtures as F
from comfyui_prdp.rewards import Reward, WeightedReward, create_reward, paper_multi_reward
from comfyui_prdp.rewards.combined import parse_components

HPS = {"arch": F.TINY_OPEN_CLIP}


@pytest.fixture(scope="module")
def model_dir():
    return F.reward_model_dir()


@pytest.fixture(scope="module")
def images():
    return F.make_images(4, size=(180, 200), seed=7)


class CountingReward(Reward):
    """A model-free reward that records prepare/offload calls."""

    def __init__(self, name, values):
        self.name = name
        self.values = torch.tensor(values, dtype=torch.float32)
        self.events = []

    def score(self, images, prompts):
        self.events.append("score")
        return self.values[: images.shape[0]].clone()

    def prepare(self):
        self.events.append("prepare")

    def offload(self):
        self.events.append("offload")


def test_weighted_sum_and_components(model_dir, images):
    prompts = F.PROMPTS[:4]
    shared = dict(model_dir=model_dir, allow_download=False, device="cpu")
    weighted = create_reward("weighted", components=[("pickscore", 10.0), ("hpsv2", 2.0, HPS),
                                                     ("aesthetic", 0.05)], **shared)
    total, parts = weighted.score_with_components(images, prompts)
    singles = {"pickscore": create_reward("pickscore", **shared).score(images, prompts),
               "hpsv2": create_reward("hpsv2", **shared, **HPS).score(images, prompts),
               "aesthetic": create_reward("aesthetic", **shared).score(images, prompts)}
    assert set(parts) == set(singles)
    for name, value in singles.items():
        torch.testing.assert_close(parts[name], value)  # components are the raw scores
    expected = 10.0 * singles["pickscore"] + 2.0 * singles["hpsv2"] + 0.05 * singles["aesthetic"]
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(weighted.score(images, prompts), expected)
    assert weighted.weights == {"pickscore": 10.0, "hpsv2": 2.0, "aesthetic": 0.05}
    assert weighted.describe() == "10*pickscore + 2*hpsv2 + 0.05*aesthetic"
    assert weighted.differentiable  # every component is


def test_paper_multi_reward(model_dir, images):
    reward = paper_multi_reward(model_dir=model_dir, allow_download=False, device="cpu",
                                component_kwargs={"hpsv2": HPS})
    assert reward.weights == {"pickscore": 10.0, "hpsv2": 2.0, "aesthetic": 0.05}
    total, parts = reward.score_with_components(images, F.PROMPTS[:4])
    torch.testing.assert_close(total, 10 * parts["pickscore"] + 2 * parts["hpsv2"] + 0.05 * parts["aesthetic"])
    v21 = paper_multi_reward("hpsv2.1", model_dir=model_dir, allow_download=False,
                             component_kwargs={"hpsv2.1": HPS})
    assert list(v21.weights) == ["pickscore", "hpsv2.1", "aesthetic"]
    with pytest.raises(ValueError, match="unknown component"):
        paper_multi_reward(component_kwargs={"hpsv2.1": HPS})
    with pytest.raises(ValueError, match="hps_version"):
        paper_multi_reward(hps_version="hpsv3")


def test_paper_multi_reward_error_lists_missing_files(tmp_path, monkeypatch):
    monkeypatch.delenv("PRDP_REWARD_MODELS", raising=False)
    with pytest.raises(FileNotFoundError, match="PickScore"):
        paper_multi_reward(model_dir=tmp_path, allow_download=False)


def test_component_spellings(model_dir, images):
    shared = dict(model_dir=model_dir, allow_download=False, device="cpu")
    from_string = create_reward("weighted", components="jpeg-compressibility:2, aesthetic : 0.5", **shared)
    from_dicts = create_reward("weighted", components=[
        {"name": "jpeg-compressibility", "weight": 2}, {"name": "aesthetic", "weight": 0.5}], **shared)
    from_tuples = create_reward("weighted", components=[("jpeg-compressibility", 2), ("aesthetic", 0.5)],
                                **shared)
    built = create_reward("aesthetic", **shared)
    from_instances = WeightedReward([("jpeg-compressibility", 2.0, create_reward("jpeg-compressibility")),
                                     ("aesthetic", 0.5, built)])
    results = [r.score(images, F.PROMPTS[:4]) for r in (from_string, from_dicts, from_tuples, from_instances)]
    for result in results[1:]:
        torch.testing.assert_close(result, results[0])
    assert from_string.weights == {"jpeg-compressibility": 2.0, "aesthetic": 0.5}
    # a JPEG component is not differentiable, so neither is the sum
    assert not from_string.differentiable


def test_parse_components():
    assert parse_components("pickscore:10, hpsv2.1:2;aesthetic:0.05") == [
        ("pickscore", 10.0), ("hpsv2.1", 2.0), ("aesthetic", 0.05)]
    assert parse_components("aesthetic") == [("aesthetic", 1.0)]
    with pytest.raises(ValueError, match="name:weight"):
        parse_components("pickscore:ten")
    with pytest.raises(ValueError, match="no rewards"):
        parse_components(" , ")


def test_duplicate_names_get_distinct_labels(images):
    weighted = create_reward("weighted", components=[("jpeg-compressibility", 1.0),
                                                     ("jpeg-compressibility", -1.0)])
    total, parts = weighted.score_with_components(images, F.PROMPTS[:4])
    assert list(parts) == ["jpeg-compressibility", "jpeg-compressibility_2"]
    torch.testing.assert_close(total, torch.zeros(4))


def test_bad_components_are_rejected():
    with pytest.raises(ValueError, match="at least one"):
        create_reward("weighted", components=[])
    with pytest.raises(ValueError, match="finite"):
        create_reward("weighted", components=[("jpeg-compressibility", float("nan"))])
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        create_reward("weighted", components=[("nope", 1.0)])
    with pytest.raises(ValueError, match="another 'weighted'"):
        create_reward("weighted", components=[("weighted", 1.0)])
    with pytest.raises(ValueError, match="unknown option"):
        create_reward("weighted", components=[("jpeg-compressibility", 1.0)], colour="red")
    with pytest.raises(ValueError, match="component dicts"):
        create_reward("weighted", components=[{"reward": "aesthetic"}])


def test_device_hooks_reach_every_component(images):
    a, b = CountingReward("a", [1, 2, 3, 4]), CountingReward("b", [10, 20, 30, 40])
    together = WeightedReward([("a", 1.0, a), ("b", 0.5, b)], one_at_a_time=False)
    together.prepare()
    torch.testing.assert_close(together.score(images, F.PROMPTS[:4]), torch.tensor([6.0, 12, 18, 24]))
    together.offload()
    assert a.events == ["prepare", "score", "offload"] and b.events == a.events
    a.events.clear(), b.events.clear()
    one_by_one = WeightedReward([("a", 1.0, a), ("b", 0.5, b)])     # the default
    assert one_by_one.one_at_a_time
    one_by_one.prepare()
    one_by_one.score(images, F.PROMPTS[:4])
    one_by_one.offload()
    # each model is on the device only while it scores
    assert a.events == ["prepare", "score", "offload", "offload"]
    assert b.events == ["prepare", "score", "offload", "offload"]
