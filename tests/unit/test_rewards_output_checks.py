"""A reward whose score is not a tensor of shape [N] (N images) is stopped where it is scored.

Checked at both entries the trainer, the nodes and the evaluation use (`score`,
`score_with_components`), for plain Reward subclasses, ModelReward subclasses and weighted sums.
"""
from __future__ import annotations

import pytest
import torch

from comfyui_prdp.rewards import Reward, WeightedReward
from comfyui_prdp.rewards.model_reward import ModelReward

IMAGES = torch.rand(3, 8, 8, 3)
PROMPTS = ["a", "b", "c"]


class FixedReward(Reward):
    """Returns whatever it was given, whatever the images."""

    def __init__(self, name, result):
        self.name = name
        self.result = result

    def score(self, images, prompts):
        return self.result


class ColumnModelReward(ModelReward):
    """A model reward whose batch scores keep a trailing dimension: [b, 1]."""

    name = "column"

    def __init__(self):
        super().__init__(device="cpu", batch_size=2)
        self.head = torch.nn.Linear(3, 1)

    def modules(self):
        return [self.head]

    def _score_batch(self, images, prompts):
        return self.head(images.mean(dim=(1, 2)))


class PartsReward(Reward):
    """Overrides score_with_components; one component has the wrong length."""

    name = "parts"

    def score(self, images, prompts):
        return self.score_with_components(images, prompts)[0]

    def score_with_components(self, images, prompts):
        total = torch.zeros(len(images))
        return total, {"good": total, "short": total[:-1]}


def test_a_list_is_refused_naming_the_reward_and_shape():
    reward = FixedReward("listy", [0.1, 0.2, 0.3])
    with pytest.raises(TypeError) as error:
        reward.score(IMAGES, PROMPTS)
    message = str(error.value)
    assert "'listy'" in message and "list" in message and "[3]" in message
    with pytest.raises(TypeError, match="'listy'"):
        reward.score_with_components(IMAGES, PROMPTS)  # the trainer's entry


@pytest.mark.parametrize("result,shape", [
    (torch.zeros(3, 1), "[3, 1]"), (torch.zeros(2), "[2]"), (torch.tensor(1.0), "[]"),
])
def test_a_wrong_shape_is_refused_at_both_entries(result, shape):
    reward = FixedReward("shapely", result)
    for entry in (reward.score, reward.score_with_components, reward):
        with pytest.raises(ValueError) as error:
            entry(IMAGES, PROMPTS)
        message = str(error.value)
        assert "'shapely'" in message and f"shape {shape}" in message
        assert "for 3 images" in message and "expected shape [3]" in message


def test_a_model_reward_returning_a_column_is_refused():
    with pytest.raises(ValueError, match=r"'column' \(ColumnModelReward\).*\[3, 1\].*expected shape \[3\]"):
        ColumnModelReward().score(IMAGES, PROMPTS)


def test_a_bad_component_is_named():
    with pytest.raises(ValueError, match=r"'parts'.*component 'short'.*\[2\]"):
        PartsReward().score_with_components(IMAGES, PROMPTS)
    weighted = WeightedReward([("ok", 1.0, FixedReward("ok", torch.ones(3))),
                               ("bad", 2.0, FixedReward("bad", torch.ones(3, 1)))])
    with pytest.raises(ValueError, match=r"'bad'.*\[3, 1\]"):
        weighted.score_with_components(IMAGES, PROMPTS)


def test_a_correct_reward_is_passed_through_unchanged():
    values = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    reward = FixedReward("fine", values)
    assert reward.score(IMAGES, PROMPTS) is values
    total, parts = reward.score_with_components(IMAGES, PROMPTS)
    assert total is values and parts == {"fine": values}
    weighted = WeightedReward([("a", 2.0, FixedReward("a", torch.ones(3))),
                               ("b", 1.0, reward)])
    total, parts = weighted.score_with_components(IMAGES, PROMPTS)
    assert torch.equal(total, torch.tensor([2.5, 1.0, 4.0]))
    total.sum().backward()
    assert torch.equal(values.grad, torch.ones(3))
