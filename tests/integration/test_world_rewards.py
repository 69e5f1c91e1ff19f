"""The world's rewards, on renders of the held-out captions with seeds no training used:
world-alignment must rank each image's own caption above captions that differ in one attribute,
and world-preference must rank centred, colourful, contrasted images above degraded ones."""
import random

import pytest
import torch

from comfyui_prdp.rewards import create_reward
from comfyui_prdp.world.alignment import one_attribute_changed
from comfyui_prdp.world.grammar import ATTRIBUTES, split_scenes
from comfyui_prdp.world.render import render_batch

# Measured on these 256 renders with the seed-0 scorer: mean margin +0.240, 96.9 % ranked right;
# per attribute count +0.27, size +0.28, colour +0.28, shape +0.10 (82 %), position +0.28,
# background +0.23. Preference: desaturated -0.22, lower contrast -0.18, off-centre -0.15 (all 100 %).
ALIGNMENT_MARGIN = 0.15          # mean cos(image, own caption) - cos(image, one attribute changed)
ALIGNMENT_RANKED = 0.85          # fraction of (image, changed caption) pairs ranked right


@pytest.fixture(scope="module")
def held_out_renders():
    scenes = random.Random(5).sample(split_scenes()[1], 256)
    images = torch.from_numpy(render_batch(scenes, [10_000 + i for i in range(len(scenes))]))
    return scenes, images


def test_world_alignment_ranks_the_own_caption_above_one_attribute_changed(held_out_renders):
    scenes, images = held_out_renders
    reward = create_reward("world-alignment")
    own = reward.score(images, [s.caption() for s in scenes])
    rng = random.Random(6)
    margins = {}
    for name, values in ATTRIBUTES.items():
        other = [s.replace(**{name: rng.choice([v for v in values if v != getattr(s, name)])}) for s in scenes]
        margins[name] = own - reward.score(images, [s.caption() for s in other])
    every = torch.cat(list(margins.values()))
    summary = ", ".join(f"{k} {v.mean():+.3f} ({(v > 0).float().mean():.0%})" for k, v in margins.items())
    assert every.mean() > ALIGNMENT_MARGIN and (every > 0).float().mean() > ALIGNMENT_RANKED, summary
    for name, margin in margins.items():   # no attribute is ignored
        assert margin.mean() > 0.05, summary


def test_world_alignment_refuses_prompts_outside_the_world():
    reward = create_reward("world-alignment")
    with pytest.raises(ValueError, match="world grammar"):
        reward.score(torch.zeros(1, 32, 32, 3), ["zzz qqq"])


def test_world_preference_prefers_centred_colourful_contrasted_images(held_out_renders):
    scenes, images = held_out_renders
    reward = create_reward("world-preference")
    base = reward.score(images, [""] * len(images))
    grey = images.mean(-1, keepdim=True).expand_as(images)
    flat = 0.5 + 0.4 * (images - 0.5)
    centred = [s.replace(position="center", count="one") for s in scenes]
    corner = [s.replace(position="left", count="one") for s in scenes]
    centred_score = reward.score(torch.from_numpy(render_batch(centred, range(256))), [""] * 256)
    corner_score = reward.score(torch.from_numpy(render_batch(corner, range(256))), [""] * 256)
    checks = {"desaturated": base - reward.score(grey, [""] * 256),
              "lower contrast": base - reward.score(flat, [""] * 256),
              "off-centre": centred_score - corner_score}
    summary = ", ".join(f"{k} {v.mean():+.3f} ({(v > 0).float().mean():.0%})" for k, v in checks.items())
    for name, margin in checks.items():
        assert margin.mean() > 0.05 and (margin > 0).float().mean() > 0.9, summary
