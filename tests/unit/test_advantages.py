"""DDPO's advantages: the per-prompt tracker against a literal re-statement of DDPO's own
algorithm, and the +-adv_clip clip."""
import collections

import pytest
import torch

from comfyui_prdp.advantages import PerPromptStatTracker
from comfyui_prdp.objective import ddpo_loss, group_advantages


def literal_tracker(epochs, buffer_size, min_count):
    """epochs: list of (prompts, rewards); DDPO's PerPromptStatTracker written out with deques."""
    stats, out = {}, []
    for prompts, rewards in epochs:
        advantages = [0.0] * len(rewards)
        all_mean = sum(rewards) / len(rewards)
        all_std = (sum((r - all_mean) ** 2 for r in rewards) / len(rewards)) ** 0.5 + 1e-6
        for prompt in sorted(set(prompts)):
            mine = [r for p, r in zip(prompts, rewards) if p == prompt]
            buffer = stats.setdefault(prompt, collections.deque(maxlen=buffer_size))
            buffer.extend(mine)
            if len(buffer) < min_count:
                mean, std = all_mean, all_std
            else:
                mean = sum(buffer) / len(buffer)
                std = (sum((r - mean) ** 2 for r in buffer) / len(buffer)) ** 0.5 + 1e-6
            for i, p in enumerate(prompts):
                if p == prompt:
                    advantages[i] = (rewards[i] - mean) / std
        out.append(advantages)
    return out


@pytest.mark.parametrize("buffer_size,min_count", [(4, 3), (16, 16), (6, 2)])
def test_tracker_equals_ddpos_algorithm_over_epochs(buffer_size, min_count):
    g = torch.Generator().manual_seed(0)
    names = ["cat", "dog", "owl"]
    epochs = []
    for e in range(7):
        prompts = [names[int(i)] for i in torch.randint(3, (2,), generator=g)]
        prompts = [p for p in prompts for _ in range(3)]       # 3 images per prompt (maybe repeated)
        rewards = (torch.randn(len(prompts), generator=g) + e * 0.3).tolist()
        epochs.append((prompts, rewards))
    tracker = PerPromptStatTracker(buffer_size, min_count)
    expected = literal_tracker(epochs, buffer_size, min_count)
    for (prompts, rewards), want in zip(epochs, expected):
        got = tracker.update(prompts, torch.tensor(rewards, dtype=torch.float64))
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # the state round-trips through plain data
    restored = PerPromptStatTracker(buffer_size, min_count)
    restored.load_state_dict(tracker.state_dict())
    assert restored.buffers == tracker.buffers


def test_tracker_state_rejects_malformed_data():
    tracker = PerPromptStatTracker()
    with pytest.raises(ValueError, match="malformed"):
        tracker.load_state_dict({"buffers": {"cat": ["not a number"]}})


def test_group_advantages_are_clipped():
    rewards = torch.zeros(1, 30, dtype=torch.float64)
    rewards[0, 0] = 1.0       # one outlier among 30: its z-score is sqrt(29) ~ 5.4 before the clip
    advantages = group_advantages(rewards, adv_clip=5.0)
    assert advantages[0, 0].item() == 5.0
    assert group_advantages(rewards, adv_clip=100.0)[0, 0].item() == pytest.approx(29 ** 0.5, rel=1e-6)


def test_ddpo_loss_clips_given_advantages():
    logp_old = torch.zeros(1, 2, 3, dtype=torch.float64)
    logp = logp_old + torch.tensor([0.5e-4, -0.5e-4], dtype=torch.float64).view(1, 2, 1)
    advantages = torch.tensor([[8.0, -8.0]], dtype=torch.float64)
    loss = ddpo_loss(logp, logp_old, logp_old, torch.zeros(1, 2, dtype=torch.float64), clip_range=1e-4,
                     adv_clip=2.0, advantages=advantages)
    ratio = torch.exp(logp - logp_old)
    adv = torch.tensor([2.0, -2.0], dtype=torch.float64).view(1, 2, 1)
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 1e-4, 1 + 1e-4)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
