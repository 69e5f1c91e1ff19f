"""The world's caption grammar: count x size x colour x shape x position x background.

    "two small red circles on the left, black background"

3 x 2 x 6 x 4 x 5 x 3 = 2,160 distinct captions. The held-out split is every caption whose
attribute indices sum to a multiple of HELD_OUT_MODULUS (299 of them, spread over every value of
every attribute): no held-out caption is a training caption, while every word and every pair of
words of a held-out caption (red + circle, circle + left, ...) occurs in training captions. So
held-out prompts are new combinations of known parts.

An earlier split held out four whole (shape, colour) pairs, which no training caption showed:
finetuning on the training captions then taught their pairs at the expense of the unseen ones
(unseen alignment fell while training alignment rose), which measured a conflict rather than
generalisation.
"""
from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from typing import List, Sequence, Tuple

COUNTS = ("one", "two", "three")
SIZES = ("small", "big")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
SHAPES = ("circle", "square", "triangle", "diamond")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("black", "white", "gray")

_COUNT_WORDS = {"one": "a", "two": "two", "three": "three"}
_POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                     "bottom": "at the bottom", "center": "in the center"}
#: a caption is held out when the sum of its attribute indices is a multiple of this
HELD_OUT_MODULUS = 8


@dataclass(frozen=True)
class Scene:
    count: str
    size: str
    colour: str
    shape: str
    position: str
    background: str

    @property
    def number(self) -> int:
        return COUNTS.index(self.count) + 1

    def caption(self) -> str:
        noun = self.shape + ("s" if self.number > 1 else "")
        return (f"{_COUNT_WORDS[self.count]} {self.size} {self.colour} {noun} "
                f"{_POSITION_PHRASES[self.position]}, {self.background} background")

    def replace(self, **changes: str) -> "Scene":
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        fields.update(changes)
        return Scene(**fields)

    @property
    def held_out(self) -> bool:
        return sum(values.index(getattr(self, name)) for name, values in ATTRIBUTES.items()) % HELD_OUT_MODULUS == 0


ATTRIBUTES = {"count": COUNTS, "size": SIZES, "colour": COLOURS, "shape": SHAPES,
              "position": POSITIONS, "background": BACKGROUNDS}


def all_scenes() -> List[Scene]:
    """Every scene of the grammar, in a fixed order."""
    return [Scene(*values) for values in itertools.product(COUNTS, SIZES, COLOURS, SHAPES, POSITIONS, BACKGROUNDS)]


def split_scenes() -> Tuple[List[Scene], List[Scene]]:
    """(train, held_out) scenes; no caption is in both."""
    scenes = all_scenes()
    return [s for s in scenes if not s.held_out], [s for s in scenes if s.held_out]


def train_prompts() -> List[str]:
    return [s.caption() for s in split_scenes()[0]]


def held_out_prompts() -> List[str]:
    return [s.caption() for s in split_scenes()[1]]


_CAPTION = re.compile(
    r"^(a|two|three) (small|big) (\w+) (\w+?)s? (on the left|on the right|at the top|at the bottom|in the center), "
    r"(\w+) background$")


def parse_caption(text: str) -> Scene:
    """The scene a caption of this grammar describes; ValueError for any other text."""
    match = _CAPTION.match(text.strip().lower())
    if not match:
        raise ValueError(f"{text!r} is not a caption of the world grammar; write e.g. "
                         f"{Scene('two', 'small', 'red', 'circle', 'left', 'black').caption()!r}")
    count_word, size, colour, shape, phrase, background = match.groups()
    count = {v: k for k, v in _COUNT_WORDS.items()}[count_word]
    position = {v: k for k, v in _POSITION_PHRASES.items()}[phrase]
    scene = Scene(count, size, colour, shape, position, background)
    for name, values in ATTRIBUTES.items():
        if getattr(scene, name) not in values:
            raise ValueError(f"{text!r}: unknown {name} {getattr(scene, name)!r}; use one of {', '.join(values)}")
    if scene.caption() != text.strip().lower():
        raise ValueError(f"{text!r} is not a caption of the world grammar (did you mean {scene.caption()!r}?)")
    return scene


def sample_prompts(prompts: Sequence[str], count: int, seed: int = 0) -> List[str]:
    """`count` distinct prompts drawn from `prompts` by a seeded RNG (all of them if fewer)."""
    if count >= len(prompts):
        return list(prompts)
    return random.Random(seed).sample(list(prompts), count)
