"""The reward registry: a name -> a factory; create_reward builds one by name, or by a reward
server's URL (http://..., remote.py). Each reward module registers its own names on import."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

from .base import Reward

_REGISTRY: Dict[str, Callable[..., Reward]] = {}


def register_reward(name: str, factory: Callable[..., Reward]) -> None:
    _REGISTRY[name] = factory


def registered_factory(name: str) -> Optional[Callable[..., Reward]]:
    """The factory registered under `name`, None when there is none."""
    return _REGISTRY.get(name)


def available_rewards() -> List[str]:
    return sorted(_REGISTRY)


def create_reward(name: str, **kwargs) -> Reward:
    """Build a reward by registry name, or by a reward server's URL (http://..., rewards/remote.py);
    unknown names get an error listing the known ones."""
    if isinstance(name, str) and name.lower().startswith(("http://", "https://")):
        from .remote import create_remote_reward
        return create_remote_reward(name, **kwargs)
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown reward {name!r}; choose one of: {', '.join(available_rewards())}"
        )
    return _REGISTRY[name](**kwargs)
