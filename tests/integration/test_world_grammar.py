"""The miniature world: its caption grammar, the train/held-out split and the renderer."""
import numpy as np
import pytest

import itertools

from comfyui_prdp.world.grammar import (ATTRIBUTES, Scene, all_scenes, held_out_prompts,
                                        parse_caption, sample_prompts, split_scenes, train_prompts)
from comfyui_prdp.world.render import BACKGROUND_RGB, COLOUR_RGB, render_scene


def test_the_grammar_has_thousands_of_distinct_captions_that_parse_back():
    scenes = all_scenes()
    captions = [s.caption() for s in scenes]
    assert len(scenes) == 2160 and len(set(captions)) == len(captions)
    assert all(parse_caption(c) == s for c, s in zip(captions, scenes))


@pytest.mark.parametrize("text", ["a painting of a cat", "a small red circle on the left",
                                  "a small pink circle on the left, black background",
                                  "two small red circle on the left, black background"])
def test_text_outside_the_grammar_is_refused_with_an_example(text):
    with pytest.raises(ValueError, match="world grammar|unknown"):
        parse_caption(text)


def _word_pairs(scene):
    return {((a, getattr(scene, a)), (b, getattr(scene, b))) for a, b in itertools.combinations(ATTRIBUTES, 2)}


def test_held_out_prompts_share_every_word_and_word_pair_but_no_caption_with_training_prompts():
    train, held_out = split_scenes()
    assert set(train_prompts()).isdisjoint(held_out_prompts())
    assert len(train) + len(held_out) == 2160 and len(held_out) == 299
    seen_pairs = set().union(*map(_word_pairs, train))
    for scene in held_out:          # a new combination of known parts
        assert _word_pairs(scene) <= seen_pairs, scene
    for name, values in ATTRIBUTES.items():   # every value is held out somewhere, and trained on
        assert {getattr(s, name) for s in held_out} == set(values), name
        assert {getattr(s, name) for s in train} == set(values), name


def test_sample_prompts_is_seeded_and_distinct():
    prompts = held_out_prompts()
    a, b, c = sample_prompts(prompts, 8, 0), sample_prompts(prompts, 8, 0), sample_prompts(prompts, 8, 1)
    assert a == b and a != c and len(set(a)) == 8


def test_renders_are_deterministic_and_seed_dependent():
    scene = Scene("two", "small", "red", "circle", "left", "black")
    a, b, c = render_scene(scene, 3), render_scene(scene, 3), render_scene(scene, 4)
    assert a.shape == (32, 32, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def _foreground(image, background):
    return np.abs(image - np.asarray(BACKGROUND_RGB[background])).sum(-1) > 0.3


@pytest.mark.parametrize("position,axis,side", [("left", 1, -1), ("right", 1, 1), ("top", 0, -1), ("bottom", 0, 1)])
def test_objects_are_drawn_where_the_caption_says_in_its_colour(position, axis, side):
    for seed in range(5):
        scene = Scene("one", "big", "blue", "square", position, "white")
        image = render_scene(scene, seed)
        mask = _foreground(image, "white")
        centre = np.argwhere(mask).mean(0)[axis]
        assert side * (centre - 15.5) > 4, (position, centre)
        inside = np.median(image[mask], axis=0)   # edges are anti-aliased towards the background
        assert np.abs(inside - np.asarray(COLOUR_RGB["blue"])).max() < 0.15


def test_counts_sizes_and_shapes_change_the_drawing():
    base = Scene("one", "small", "yellow", "circle", "center", "gray")
    area = lambda scene: _foreground(render_scene(scene, 0), scene.background).sum()   # noqa: E731
    assert area(base.replace(count="three")) > 2.5 * area(base)
    assert area(base.replace(size="big")) > 2 * area(base)
    masks = [_foreground(render_scene(base.replace(size="big", shape=s), 0), "gray") for s in ATTRIBUTES["shape"]]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert (masks[i] != masks[j]).sum() >= 8, (ATTRIBUTES["shape"][i], ATTRIBUTES["shape"][j])
