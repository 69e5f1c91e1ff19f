"""The loss's per-step weights are exact at the paper's beta/eps (docs/algorithm.md section 2.2, float64).

The reference is autograd of a literal Python pair loop in float64, built element by element,
so it shares no code with objective.py.
"""
import itertools

import pytest
import torch

from comfyui_prdp.config import PRESETS
from comfyui_prdp.objective import logp_gradient_weights, prdp_loss


def literal_pair_loss(logp, logp_old, logp_ref, rewards, beta, eps):
    """One group [B, T]: mean over pairs with r_i > r_j of the max of the two squared residuals."""
    B, T = logp.shape
    s, sc = [], []
    for i in range(B):
        total, total_clipped = 0, 0
        for t in range(T):
            rho = logp[i, t] - logp_ref[i, t]
            rho_old = logp_old[i, t] - logp_ref[i, t]
            total = total + rho
            total_clipped = total_clipped + torch.minimum(torch.maximum(rho, rho_old - eps), rho_old + eps)
        s.append(total / T)
        sc.append(total_clipped / T)
    losses = []
    for i, j in itertools.product(range(B), range(B)):
        R = float(rewards[i] - rewards[j])
        if R > 0:
            unclipped = (s[i] - s[j] - R / beta) ** 2
            clipped = (sc[i] - sc[j] - R / beta) ** 2
            losses.append(unclipped if unclipped >= clipped else clipped)
    return sum(losses) / len(losses)


def realistic_case(eps, seed, B=8, T=50):
    """Log-ratios ~10 eps; after an update the better samples' log-probs moved up and the worse
    ones' down by a few eps (what PRDP does), so some steps leave the clip range."""
    g = torch.Generator().manual_seed(seed)
    logp_ref = 3.0 + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    logp_old = logp_ref + 10 * eps * torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = 0.27 + 0.01 * torch.randn(B, generator=g, dtype=torch.float64)
    rank = rewards.argsort().argsort().double()
    direction = 2 * rank / (B - 1) - 1                      # -1 (worst) .. 1 (best)
    moved = eps * (2.5 * direction[:, None] + 0.7 * torch.randn(B, T, generator=g, dtype=torch.float64))
    return logp_old + moved, logp_old, logp_ref, rewards


@pytest.mark.parametrize("preset_name", ["paper-small", "paper-large", "paper-multi-reward", "consumer-gpu"])
@pytest.mark.parametrize("seed", [0, 1])
def test_weights_equal_float64_autograd_of_the_literal_loss(preset_name, seed):
    beta, eps = PRESETS[preset_name]["beta"], PRESETS[preset_name]["clip_range"]
    logp, logp_old, logp_ref, rewards = realistic_case(eps, seed)
    leaf = logp.clone().requires_grad_(True)
    expected_loss = literal_pair_loss(leaf, logp_old, logp_ref, rewards, beta, eps)
    (expected,) = torch.autograd.grad(expected_loss, leaf)

    loss, weights = logp_gradient_weights(prdp_loss, logp[None], logp_old[None], logp_ref[None],
                                          rewards[None], beta=beta, clip_range=eps)
    weights = weights[0]
    assert weights.dtype == torch.float64
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-9)
    assert torch.equal(weights == 0, expected == 0), "exact zeros differ"
    assert (expected == 0).any() and (expected != 0).any(), "the case must exercise both"
    nonzero = expected != 0
    rel = ((weights - expected).abs() / expected.abs())[nonzero]
    assert rel.max().item() < 1e-6


def test_a_step_past_the_clip_range_gets_exactly_zero_weight():
    # the minimal case: one pair, beta 3e-5, eps 1e-6, the better sample's step 0 moved
    # 3e-6 past rho_old; the clipped branch is active, so that step's weight is exactly 0
    beta, eps = 3e-5, 1e-6
    T = 50
    logp_ref = torch.full((1, 2, T), 2.9, dtype=torch.float64)
    logp_old = logp_ref.clone()
    logp = logp_old.clone()
    logp[0, 1, 0] += 3e-6
    rewards = torch.tensor([[0.0, 0.01]], dtype=torch.float64)
    _, weights = logp_gradient_weights(prdp_loss, logp, logp_old, logp_ref, rewards, beta=beta, clip_range=eps)
    assert weights[0, 1, 0].item() == 0.0
    # the unmoved steps keep the full weight 2 * residual / T of the pair's squared residual
    residual = (0 - 0.01 / beta) + eps / T      # s_clip_1 - s_clip_0 - R / beta
    assert weights[0, 1, 1].item() == pytest.approx(2 * residual / T, rel=1e-9)
    assert weights[0, 0, 1].item() == pytest.approx(-2 * residual / T, rel=1e-9)
