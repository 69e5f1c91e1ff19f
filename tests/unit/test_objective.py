"""prdp_loss / ddpo_loss against independent loop implementations and hand-made cases."""
import itertools

import pytest
import torch

from comfyui_prdp.objective import clip_fraction, ddpo_loss, logp_gradient_weights, prdp_loss


def loop_prdp(logp, logp_old, logp_ref, rewards, beta, eps):
    """Literal docs/algorithm.md section 2, one prompt group at a time, with Python loops."""
    group_losses = []
    for g in range(len(logp)):
        B, T = len(logp[g]), len(logp[g][0])
        s, sc = [], []
        for i in range(B):
            rho = [logp[g][i][t] - logp_ref[g][i][t] for t in range(T)]
            rho_old = [logp_old[g][i][t] - logp_ref[g][i][t] for t in range(T)]
            clipped = [min(max(rho[t], rho_old[t] - eps), rho_old[t] + eps) for t in range(T)]
            s.append(sum(rho) / T)
            sc.append(sum(clipped) / T)
        pair_losses = []
        for i, j in itertools.product(range(B), range(B)):
            R = rewards[g][i] - rewards[g][j]
            if R > 0:
                pair_losses.append(max((s[i] - s[j] - R / beta) ** 2, (sc[i] - sc[j] - R / beta) ** 2))
        group_losses.append(sum(pair_losses) / len(pair_losses) if pair_losses else 0.0)
    return sum(group_losses) / len(group_losses)


def random_case(G=3, B=4, T=5, seed=0, spread=0.05):
    g = torch.Generator().manual_seed(seed)
    logp_ref = torch.randn(G, B, T, generator=g, dtype=torch.float64)
    logp_old = logp_ref + spread * torch.randn(G, B, T, generator=g, dtype=torch.float64)
    logp = logp_old + spread * torch.randn(G, B, T, generator=g, dtype=torch.float64)
    rewards = torch.randn(G, B, generator=g, dtype=torch.float64)
    return logp, logp_old, logp_ref, rewards


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("eps", [1e-3, 0.03, 10.0])
def test_prdp_matches_literal_loops(seed, eps):
    logp, logp_old, logp_ref, rewards = random_case(seed=seed)
    got = prdp_loss(logp, logp_old, logp_ref, rewards, beta=0.5, clip_range=eps)
    expected = loop_prdp(logp.tolist(), logp_old.tolist(), logp_ref.tolist(), rewards.tolist(), 0.5, eps)
    assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_pairs_only_where_first_reward_is_larger():
    # B=2, T=1, no clipping active: only pair (1, 0) counts since r_1 > r_0
    logp = torch.tensor([[[0.0], [0.3]]])
    zeros = torch.zeros(1, 2, 1)
    rewards = torch.tensor([[1.0, 2.0]])
    loss = prdp_loss(logp, logp.clone(), zeros, rewards, beta=1.0, clip_range=100.0)
    assert loss.item() == pytest.approx((0.3 - 0.0 - 1.0) ** 2)


def test_max_of_clipped_and_unclipped_branch():
    # rho moved far beyond the clip range in the helpful direction: clipped residual is larger
    logp_ref = torch.zeros(1, 2, 1)
    logp_old = torch.zeros(1, 2, 1)
    logp = torch.tensor([[[0.0], [0.9]]])
    rewards = torch.tensor([[0.0, 1.0]])
    loss = prdp_loss(logp, logp_old, logp_ref, rewards, beta=1.0, clip_range=0.1)
    unclipped = (0.9 - 1.0) ** 2
    clipped = (0.1 - 1.0) ** 2
    assert loss.item() == pytest.approx(max(unclipped, clipped))
    # and the gradient through the clipped branch is zero outside the clip range
    _, w = logp_gradient_weights(prdp_loss, logp, logp_old, logp_ref, rewards, beta=1.0, clip_range=0.1)
    assert w[0, 1, 0] == 0


def test_clipping_is_per_step():
    # step 0 moves beyond the range, step 1 stays inside: only step 0 is clipped
    logp_ref = torch.zeros(1, 2, 2)
    logp_old = torch.zeros(1, 2, 2)
    logp = torch.tensor([[[0.0, 0.0], [0.5, 0.05]]])
    rewards = torch.tensor([[0.0, 1.0]])
    loss = prdp_loss(logp, logp_old, logp_ref, rewards, beta=1.0, clip_range=0.1)
    s_clip = (0.1 + 0.05) / 2
    s = (0.5 + 0.05) / 2
    assert loss.item() == pytest.approx(max((s - 1) ** 2, (s_clip - 1) ** 2))
    _, w = logp_gradient_weights(prdp_loss, logp, logp_old, logp_ref, rewards, beta=1.0, clip_range=0.1)
    assert w[0, 1, 0] == 0 and w[0, 1, 1] != 0


def test_groups_are_kept_apart():
    logp, logp_old, logp_ref, rewards = random_case(G=2, seed=7)
    joint = prdp_loss(logp, logp_old, logp_ref, rewards, beta=0.3, clip_range=0.02)
    separate = [prdp_loss(logp[g:g + 1], logp_old[g:g + 1], logp_ref[g:g + 1], rewards[g:g + 1],
                          beta=0.3, clip_range=0.02) for g in range(2)]
    assert joint.item() == pytest.approx((separate[0].item() + separate[1].item()) / 2)
    merged = prdp_loss(logp.reshape(1, 8, 5), logp_old.reshape(1, 8, 5), logp_ref.reshape(1, 8, 5),
                       rewards.reshape(1, 8), beta=0.3, clip_range=0.02)
    assert merged.item() != pytest.approx(joint.item())


def test_leading_dims_are_flattened_groups():
    logp, logp_old, logp_ref, rewards = random_case(G=6, seed=2)
    flat = prdp_loss(logp, logp_old, logp_ref, rewards, beta=0.3, clip_range=0.02)
    nested = prdp_loss(logp.view(2, 3, 4, 5), logp_old.view(2, 3, 4, 5), logp_ref.view(2, 3, 4, 5),
                       rewards.view(2, 3, 4), beta=0.3, clip_range=0.02)
    assert flat.item() == pytest.approx(nested.item())


def test_zero_pairs_gives_zero_loss_and_gradient():
    logp, logp_old, logp_ref, _ = random_case(G=2)
    rewards = torch.ones(2, 4, dtype=torch.float64)
    loss, w = logp_gradient_weights(prdp_loss, logp, logp_old, logp_ref, rewards, beta=0.1, clip_range=0.1)
    assert loss.item() == 0.0 and (w == 0).all()


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="rewards shape"):
        prdp_loss(torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), torch.zeros(2, 3),
                  beta=1.0, clip_range=0.1)


def test_gradient_weights_equal_autograd_of_the_loss():
    logp, logp_old, logp_ref, rewards = random_case(seed=3)
    leaf = logp.clone().requires_grad_(True)
    prdp_loss(leaf, logp_old, logp_ref, rewards, beta=0.5, clip_range=0.04).backward()
    _, w = logp_gradient_weights(prdp_loss, logp, logp_old, logp_ref, rewards, beta=0.5, clip_range=0.04)
    assert torch.allclose(w.double(), leaf.grad, atol=1e-6)


def test_ddpo_loss_matches_literal_definition():
    logp, logp_old, _, rewards = random_case(seed=5, spread=1e-4)
    got = ddpo_loss(logp, logp_old, None, rewards, clip_range=1e-4, adv_clip=5.0)
    values = []
    for g in range(3):
        r = rewards[g].tolist()
        mean = sum(r) / len(r)
        std = (sum((x - mean) ** 2 for x in r) / len(r)) ** 0.5
        for i in range(4):
            adv = max(-5.0, min(5.0, (r[i] - mean) / (std + 1e-8)))
            for t in range(5):
                ratio = torch.exp(logp[g, i, t] - logp_old[g, i, t]).item()
                values.append(max(-adv * ratio, -adv * min(max(ratio, 1 - 1e-4), 1 + 1e-4)))
    assert got.item() == pytest.approx(sum(values) / len(values), rel=1e-9)


def test_clip_fraction_counts_steps_outside_range():
    logp_old = torch.zeros(1, 2, 4)
    logp = torch.tensor([[[0.0, 0.2, -0.2, 0.05], [0.0, 0.0, 0.0, 0.5]]])
    assert clip_fraction(logp, logp_old, 0.1) == pytest.approx(3 / 8)


def test_perfect_reward_difference_prediction_is_the_kl_regularised_optimum():
    """Spec section 2 theory: on a one-step categorical policy, minimising the RDP loss over all
    pairs gives p* proportional to p_ref * exp(r / beta), the maximiser of E[r] - beta*KL."""
    torch.manual_seed(0)
    K, beta = 5, 0.5
    ref_logits = torch.randn(K, dtype=torch.float64)
    rewards = torch.randn(K, dtype=torch.float64)
    logits = ref_logits.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    logp_ref = torch.log_softmax(ref_logits, 0).view(1, K, 1)
    for _ in range(3000):
        logp = torch.log_softmax(logits, 0).view(1, K, 1)
        loss = prdp_loss(logp, logp.detach(), logp_ref, rewards.view(1, K), beta=beta, clip_range=1e9)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    learned = torch.softmax(logits.detach(), 0)
    optimum = torch.softmax(ref_logits + rewards / beta, 0)
    assert torch.allclose(learned, optimum, atol=1e-3)
    # a wrong sign in the objective would move towards softmax(ref - r/beta) instead
    assert not torch.allclose(optimum, torch.softmax(ref_logits - rewards / beta, 0), atol=1e-2)
