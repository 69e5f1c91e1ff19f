"""DDPO's advantages as its authors compute them: per-prompt reward statistics tracked across
epochs (docs/algorithm.md section 6).

Each prompt keeps a buffer of its last `buffer_size` rewards. While a prompt's buffer holds
fewer than `min_count`, its rewards are normalised with the statistics of the whole epoch's
batch; after that, with the buffer's mean and (population) std. std gets + 1e-6.
The tracker's state is plain JSON (a dict of float lists), so it checkpoints without pickle.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

STD_EPS = 1e-6


class PerPromptStatTracker:
    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        if buffer_size < 1 or not 1 <= min_count <= buffer_size:
            raise ValueError(f"buffer_size={buffer_size}, min_count={min_count}: need "
                             "1 <= min_count <= buffer_size")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: Dict[str, List[float]] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add this epoch's rewards [n] (one per prompt in `prompts`) and return their
        advantages [n] (float64, unclipped)."""
        rewards = rewards.detach().double().cpu().reshape(-1)
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts for {len(rewards)} rewards")
        batch_mean = rewards.mean()
        batch_std = rewards.std(unbiased=False) + STD_EPS
        advantages = torch.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):     # unique, in order
            rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buffer = self.buffers.setdefault(prompt, [])
            buffer.extend(rewards[rows].tolist())
            del buffer[:-self.buffer_size]
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                history = torch.tensor(buffer, dtype=torch.float64)
                mean, std = history.mean(), history.std(unbiased=False) + STD_EPS
            advantages[rows] = (rewards[rows] - mean) / std
        return advantages

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {prompt: list(values) for prompt, values in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        buffers = state.get("buffers", {})
        if not isinstance(buffers, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)
                for k, v in buffers.items()):
            raise ValueError("DDPO reward buffers in the checkpoint are malformed (expected "
                             "{prompt: [reward, ...]})")
        self.buffers = {k: [float(x) for x in v][-self.buffer_size:] for k, v in buffers.items()}
