"""A person's answer about one prompt's B images -> rewards for PRDP (pure functions).

Answers (indices are 0-based positions in the prompt's group of B images):

- {"best": i, "worst": j} (i != j): r_best = 1, r_worst = -1, every other image 0.
- {"order": [i1, i2, ..., ik]} (k >= 2 distinct indices, best first): the listed images get
  k-1, k-2, ..., 0 and every image not listed gets -1 (tied below the listed ones: PRDP forms
  no pairs among them).
- {"skip": true}: no preference. `choices_to_rewards` returns None and the caller gives the
  prompt's images equal rewards, so PRDP (which pairs only r_i > r_j) forms no pairs from it:
  never a fake zero against other images.

The optional assist reward (`with_assist`) adds `weight * a` where `a` is the assist's scores
min-max normalised within the prompt's group to 0..1 (all equal: 0). Human levels differ by at
least 1, so a weight below 1 only breaks the person's ties and orders skipped prompts; it never
turns a preference the person gave around. A weight of 1 or more may.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

ANSWER_KEYS = ("best", "worst", "order", "skip")


class AnswerError(ValueError):
    """An answer that is malformed for this ballot; the message names the problem."""


def _index(value: Any, name: str, count: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AnswerError(f"{name} must be an image index (an integer 0..{count - 1}), not {value!r}")
    if not 0 <= value < count:
        raise AnswerError(f"{name} index {value} is out of range: this prompt has {count} images (0..{count - 1})")
    return value


def parse_answer(answer: Any, count: int, where: str = "answer") -> Dict[str, Any]:
    """The answer in its normal form ({"best", "worst"} | {"order"} | {"skip": True}); AnswerError
    naming the problem (prefixed with `where`) when it is not one for a group of `count` images."""
    try:
        if not isinstance(answer, dict):
            raise AnswerError(f"must be an object such as {{\"best\": 0, \"worst\": 1}}, {{\"order\": [2, 0, 1]}} "
                              f"or {{\"skip\": true}}, not {type(answer).__name__}")
        unknown = sorted(set(answer) - set(ANSWER_KEYS))
        if unknown:
            raise AnswerError(f"unknown key(s) {', '.join(map(repr, unknown))}; use best+worst, order or skip")
        if "skip" in answer:
            if answer["skip"] is not True:
                raise AnswerError("skip must be true (leave it out to give a preference)")
            if len(answer) > 1:
                raise AnswerError("skip cannot be combined with best, worst or order")
            return {"skip": True}
        if "order" in answer:
            if "best" in answer or "worst" in answer:
                raise AnswerError("give either order or best+worst, not both")
            order = answer["order"]
            if not isinstance(order, list):
                raise AnswerError(f"order must be a list of image indices, best first, not {type(order).__name__}")
            indices = [_index(value, f"order[{k}]", count) for k, value in enumerate(order)]
            if len(set(indices)) != len(indices):
                repeated = sorted({i for i in indices if indices.count(i) > 1})
                raise AnswerError(f"order lists image(s) {repeated} more than once; each image at most once")
            if len(indices) < 2:
                raise AnswerError("order must rank at least 2 images (best first)")
            return {"order": indices}
        if "best" not in answer or "worst" not in answer:
            raise AnswerError("give both best and worst (or order, or skip)")
        best = _index(answer["best"], "best", count)
        worst = _index(answer["worst"], "worst", count)
        if best == worst:
            raise AnswerError(f"best and worst are the same image ({best}); choose two different images")
        return {"best": best, "worst": worst}
    except AnswerError as error:
        raise AnswerError(f"{where}: {error}") from None


def choices_to_rewards(answer: Any, count: int) -> Optional[torch.Tensor]:
    """The rewards [count] (float32) an answer gives the prompt's images; None for a skip (no
    preference: the caller makes the group's rewards equal). AnswerError for a malformed answer."""
    answer = parse_answer(answer, count)
    if answer.get("skip"):
        return None
    if "order" in answer:
        order = answer["order"]
        rewards = torch.full((count,), -1.0)
        for rank, index in enumerate(order):
            rewards[index] = float(len(order) - 1 - rank)
        return rewards
    rewards = torch.zeros(count)
    rewards[answer["best"]] = 1.0
    rewards[answer["worst"]] = -1.0
    return rewards


def normalised_within_group(scores: torch.Tensor) -> torch.Tensor:
    """`scores` [B] mapped to 0..1 by the group's min and max (all equal: zeros)."""
    scores = scores.detach().float().cpu()
    low, high = scores.min(), scores.max()
    if not torch.isfinite(scores).all():
        raise ValueError(f"the assist reward gave non-finite scores: {scores.tolist()}")
    if high - low <= 0:
        return torch.zeros_like(scores)
    return (scores - low) / (high - low)


def with_assist(human: Optional[torch.Tensor], assist: Optional[torch.Tensor], weight: float,
                count: int) -> torch.Tensor:
    """A prompt's rewards: human (zeros for a skip) + weight * assist normalised within the group.
    Without an assist (None) or with weight 0 the human rewards alone (a skip: all zero)."""
    rewards = torch.zeros(count) if human is None else human.float().clone()
    if assist is not None and weight > 0:
        rewards = rewards + float(weight) * normalised_within_group(assist)
    return rewards


def rewards_for_answers(answers: List[Any], images_per_prompt: int) -> List[Optional[torch.Tensor]]:
    """One prompt's rewards (or None for a skip) per answer."""
    return [choices_to_rewards(answer, images_per_prompt) for answer in answers]
