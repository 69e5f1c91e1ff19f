"""Weighted sums of rewards: total = sum_i w_i * r_i, each raw r_i reported as a component.

`create_reward("weighted", components=...)` accepts, for `components`:
  - a list of (name, weight) or (name, weight, kwargs) tuples, e.g.
    [("pickscore", 10.0), ("hpsv2", 2.0, {"path": "/m/HPS_v2_compressed.pt"})];
  - a list of dicts {"name": ..., "weight": ..., "kwargs": {...}, "label": ...};
  - (reward, weight) pairs with an already built Reward;
  - a string "pickscore:10, hpsv2:2, aesthetic:0.05".
Other keyword arguments (device, dtype, batch_size, model_dir, allow_download) are passed to
every component built by name, unless its own kwargs set them.
`paper_multi_reward()` builds the paper's PickScore 10 + HPSv2 2 + aesthetic 0.05.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .base import Reward
from .registry import create_reward, register_reward
from .model_files import RewardModelNotFoundError

#: the multi-reward weights of Deng et al. (2024), Table 4
PAPER_MULTI_REWARD = (("pickscore", 10.0), ("hpsv2", 2.0), ("aesthetic", 0.05))
_SHARED_OPTIONS = ("device", "dtype", "batch_size", "model_dir", "allow_download")


class WeightedReward(Reward):
    """sum_i w_i * r_i over named component rewards; components are the raw (unweighted) r_i."""

    name = "weighted"

    def __init__(self, components: Sequence[Tuple[str, float, Reward]], one_at_a_time: bool = True):
        """components: (label, weight, reward). one_at_a_time (the default): only one component's
        model is on the GPU at a time, each offloaded after it scored (the paper's mix is ~5 GB
        in fp16 at once; one at a time its largest part, PickScore's CLIP-H, ~2 GB)."""
        if not components:
            raise ValueError("a weighted reward needs at least one component")
        labels = [label for label, _, _ in components]
        if len(set(labels)) != len(labels):
            raise ValueError(f"component labels must be unique, got {labels}")
        for label, weight, reward in components:
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"weight of {label!r} must be a finite number, got {weight!r}")
            if not isinstance(reward, Reward):
                raise TypeError(f"component {label!r} is a {type(reward).__name__}, not a Reward")
        self.components = [(label, float(weight), reward) for label, weight, reward in components]
        self.one_at_a_time = one_at_a_time
        self.differentiable = all(r.differentiable for _, _, r in self.components)

    @property
    def weights(self) -> Dict[str, float]:
        return {label: weight for label, weight, _ in self.components}

    def describe(self) -> str:
        """'10*pickscore + 2*hpsv2 + 0.05*aesthetic'."""
        return " + ".join(f"{weight:g}*{label}" for label, weight, _ in self.components)

    def score(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        return self.score_with_components(images, prompts)[0]

    def score_with_components(
        self, images: torch.Tensor, prompts: List[str]
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        parts: Dict[str, torch.Tensor] = {}
        total: Optional[torch.Tensor] = None
        for label, weight, reward in self.components:
            if self.one_at_a_time:
                reward.prepare()
            try:
                value = reward.score(images, prompts).float()
            finally:
                if self.one_at_a_time:
                    reward.offload()
            parts[label] = value
            total = weight * value if total is None else total + weight * value
        return total, parts

    def device_bytes(self) -> int:
        """The largest part when they score one at a time, else all of them."""
        sizes = [reward.device_bytes() for _, _, reward in self.components]
        return max(sizes) if self.one_at_a_time else sum(sizes)

    def prepare(self) -> None:
        if not self.one_at_a_time:
            for _, _, reward in self.components:
                reward.prepare()

    def offload(self) -> None:
        for _, _, reward in self.components:
            reward.offload()

    def __repr__(self) -> str:
        return f"WeightedReward({self.describe()})"


ComponentSpec = Union[str, Tuple, Mapping[str, Any]]


def parse_components(spec: str) -> List[Tuple[str, float]]:
    """'pickscore:10, hpsv2:2' -> [("pickscore", 10.0), ("hpsv2", 2.0)] (weight defaults to 1)."""
    parsed = []
    for item in (part.strip() for part in spec.replace(";", ",").split(",")):
        if not item:
            continue
        name, _, weight = item.rpartition(":") if ":" in item else (item, "", "1")
        try:
            parsed.append((name.strip(), float(weight)))
        except ValueError:
            raise ValueError(f"cannot read the weight in {item!r}; write name:weight, "
                             "e.g. 'pickscore:10, hpsv2:2'") from None
    if not parsed:
        raise ValueError(f"no rewards in {spec!r}; write e.g. 'pickscore:10, hpsv2:2'")
    return parsed


def _normalise_component(item: ComponentSpec) -> Tuple[Any, float, Dict[str, Any], Optional[str]]:
    """-> (name or Reward, weight, kwargs, label)."""
    if isinstance(item, Mapping):
        unknown = set(item) - {"name", "weight", "kwargs", "label"}
        if unknown or "name" not in item:
            raise ValueError(f"component dicts take name, weight, kwargs, label; got {dict(item)}")
        return item["name"], item.get("weight", 1.0), dict(item.get("kwargs") or {}), item.get("label")
    if isinstance(item, Reward):
        return item, 1.0, {}, None
    if isinstance(item, (tuple, list)) and 1 <= len(item) <= 3:
        source = item[0]
        weight = item[1] if len(item) > 1 else 1.0
        kwargs = dict(item[2]) if len(item) > 2 and item[2] else {}
        return source, weight, kwargs, None
    if isinstance(item, str):
        return item, 1.0, {}, None
    raise ValueError(f"cannot read reward component {item!r}; use (name, weight[, kwargs])")


def create_weighted(
    components: Union[str, Sequence[ComponentSpec]] = PAPER_MULTI_REWARD,
    *,
    one_at_a_time: bool = True,
    **shared: Any,
) -> WeightedReward:
    """Build a weighted reward (see the module docstring for the accepted forms)."""
    unknown = set(shared) - set(_SHARED_OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) for the weighted reward: {', '.join(sorted(unknown))}; "
                         f"options passed to every component are {', '.join(_SHARED_OPTIONS)}")
    items = parse_components(components) if isinstance(components, str) else list(components)
    built: List[Tuple[str, float, Reward]] = []
    missing: List[Tuple[str, RewardModelNotFoundError]] = []
    for item in items:
        source, weight, kwargs, label = _normalise_component(item)
        if isinstance(source, Reward):
            reward = source
        else:
            if source == "weighted":
                raise ValueError("a weighted reward cannot contain another 'weighted' by name")
            try:
                reward = create_reward(source, **{**shared, **kwargs})
            except RewardModelNotFoundError as error:   # go on: name every missing part at once
                missing.append((label or str(source), error))
                continue
        label = label or _unique_label(reward.name, [b[0] for b in built])
        built.append((label, weight, reward))
    if missing:
        raise _all_missing(missing, len(items))
    return WeightedReward(built, one_at_a_time=one_at_a_time)


def _all_missing(missing: List[Tuple[str, RewardModelNotFoundError]], parts: int) -> RewardModelNotFoundError:
    names = ", ".join(name for name, _ in missing)
    header = (f"weighted reward: {len(missing)} of its {parts} parts have no weights ({names}); "
              "each one below says what to put where.")
    return RewardModelNotFoundError("\n\n".join([header] + [f"[{name}] {error}" for name, error in missing]))


def _unique_label(name: str, taken: List[str]) -> str:
    if name not in taken:
        return name
    index = 2
    while f"{name}_{index}" in taken:
        index += 1
    return f"{name}_{index}"


def paper_multi_reward(hps_version: str = "hpsv2",
                       component_kwargs: Optional[Mapping[str, Mapping[str, Any]]] = None,
                       **shared: Any) -> WeightedReward:
    """PickScore x10 + HPSv2 x2 + aesthetic x0.05 (Deng et al. 2024, multi-reward setting).

    component_kwargs: per-component options by name, e.g. {"hpsv2": {"path": ...}}.
    """
    if hps_version not in ("hpsv2", "hpsv2.1"):
        raise ValueError(f"hps_version={hps_version!r}: use 'hpsv2' or 'hpsv2.1'")
    extra = dict(component_kwargs or {})
    names = [hps_version if name == "hpsv2" else name for name, _ in PAPER_MULTI_REWARD]
    unknown = set(extra) - set(names)
    if unknown:
        raise ValueError(f"component_kwargs for unknown component(s) {sorted(unknown)}; "
                         f"the components are {names}")
    components = [(name, weight, dict(extra.get(name, {})))
                  for name, (_, weight) in zip(names, PAPER_MULTI_REWARD)]
    return create_weighted(components, **shared)


register_reward("weighted", create_weighted)
