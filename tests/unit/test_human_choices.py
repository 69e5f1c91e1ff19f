"""The human reward's answers -> rewards -> the PRDP pairs, exactly (rewards/human/choices.py);
the assist reward's tie-breaking; the CLI's refusal. Fast tier: no model, no trainer."""
import pytest
import torch

from comfyui_prdp import rewards
from comfyui_prdp.objective import pair_agreement, prdp_loss
from comfyui_prdp.rewards.human import CLI_REFUSAL, AnswerError, HumanReward, choices_to_rewards, with_assist
from comfyui_prdp.rewards.human.choices import parse_answer


def prdp_pairs(rewards_b):
    """The pairs (i, j) PRDP trains on for one group: the candidate set {r_i > r_j}, checked
    against objective.py itself: its pair count (pair_agreement) and its loss at random
    log-ratios equal to the mean over exactly these pairs."""
    B = len(rewards_b)
    pairs = {(i, j) for i in range(B) for j in range(B) if rewards_b[i] > rewards_b[j]}
    _, count = pair_agreement(torch.zeros(1, B, 1), torch.zeros(1, B, 1), rewards_b[None])
    assert count == len(pairs)
    s = torch.randn(B, dtype=torch.float64, generator=torch.Generator().manual_seed(B))
    loss = prdp_loss(s[None, :, None], s[None, :, None], torch.zeros(1, B, 1, dtype=torch.float64),
                     rewards_b[None].double(), beta=0.5, clip_range=10.0)
    expected = (sum((s[i] - s[j] - (rewards_b[i] - rewards_b[j]) / 0.5) ** 2 for i, j in pairs) / len(pairs)
                if pairs else torch.tensor(0.0, dtype=torch.float64))
    assert torch.allclose(loss, torch.as_tensor(expected, dtype=torch.float64))
    return pairs


def test_best_worst():
    r = choices_to_rewards({"best": 2, "worst": 0}, 4)
    assert r.tolist() == [-1.0, 0.0, 1.0, 0.0]
    assert prdp_pairs(r) == {(2, 0), (2, 1), (2, 3), (1, 0), (3, 0)}     # no pair between the two middle ones


def test_full_ranking():
    r = choices_to_rewards({"order": [3, 1, 0, 2]}, 4)
    assert r.tolist() == [1.0, 2.0, 0.0, 3.0]
    assert prdp_pairs(r) == {(3, 1), (3, 0), (3, 2), (1, 0), (1, 2), (0, 2)}


def test_partial_ranking_ties_the_rest_below():
    r = choices_to_rewards({"order": [2, 0]}, 5)
    assert r.tolist() == [0.0, -1.0, 1.0, -1.0, -1.0]
    assert prdp_pairs(r) == {(2, 0), (2, 1), (2, 3), (2, 4), (0, 1), (0, 3), (0, 4)}   # none among 1, 3, 4


def test_skip_gives_no_pairs():
    assert choices_to_rewards({"skip": True}, 4) is None
    r = with_assist(None, None, 0.0, 4)
    assert r.tolist() == [0.0] * 4 and prdp_pairs(r) == set()


@pytest.mark.parametrize("answer, problem", [
    ({"best": 1, "worst": 1}, "same image"),
    ({"best": 4, "worst": 0}, "out of range"),
    ({"best": -1, "worst": 0}, "out of range"),
    ({"best": True, "worst": 0}, "integer"),
    ({"best": "1", "worst": 0}, "integer"),
    ({"best": 1}, "both best and worst"),
    ({"order": [1, 1, 2]}, "more than once"),
    ({"order": [1]}, "at least 2"),
    ({"order": "12"}, "list"),
    ({"order": [0, 1], "best": 0}, "not both"),
    ({"skip": False}, "skip must be true"),
    ({"skip": True, "best": 0}, "cannot be combined"),
    ({"rank": [0, 1]}, "unknown key"),
    ([0, 1], "must be an object"),
])
def test_malformed_answers_are_named(answer, problem):
    with pytest.raises(AnswerError, match=problem):
        choices_to_rewards(answer, 4)


def test_parse_answer_normal_form():
    assert parse_answer({"order": [0, 3]}, 4) == {"order": [0, 3]}
    assert parse_answer({"worst": 3, "best": 0}, 4) == {"best": 0, "worst": 3}


def test_assist_breaks_ties_and_stands_in_for_skips_never_overturns():
    human = choices_to_rewards({"best": 0, "worst": 1}, 4)
    assist = torch.tensor([0.0, 10.0, 2.0, 4.0])     # disagrees with the person on 0 vs 1
    r = with_assist(human, assist, 0.5, 4)
    # r = human + 0.5 * (assist - min) / (max - min)
    assert torch.allclose(r, torch.tensor([1.0, -1.0 + 0.5, 0.1, 0.2]))
    assert prdp_pairs(r) == {(0, 1), (0, 2), (0, 3), (2, 1), (3, 1), (3, 2)}   # the tie 2~3 broken by the assist
    skipped = with_assist(None, assist, 0.5, 4)
    assert torch.allclose(skipped, torch.tensor([0.0, 0.5, 0.1, 0.2]))
    assert with_assist(None, torch.ones(4), 0.5, 4).tolist() == [0.0] * 4        # an undecided assist: no pairs
    assert torch.equal(with_assist(human, assist, 0.0, 4), human)                 # weight 0: off


def test_constructor_refusals():
    with pytest.raises(ValueError, match="needs an assist reward"):
        HumanReward(on_timeout="assist")
    with pytest.raises(ValueError, match="on_timeout must be one of"):
        HumanReward(on_timeout="later")
    with pytest.raises(ValueError, match="assist_weight"):
        HumanReward(assist_weight=-1)
    with pytest.raises(RuntimeError, match="not attached"):
        HumanReward().score(torch.zeros(4, 8, 8, 3), ["a"] * 4)


def test_cli_refuses_human_with_a_clear_message():
    with pytest.raises(ValueError, match="command line cannot ask"):
        rewards.create_reward("human")
    from argparse import Namespace

    from comfyui_prdp.cli.reward import make_reward
    with pytest.raises(SystemExit, match="error: the human reward"):
        make_reward(Namespace(reward="human", reward_spec=None, reward_path=None, device=None))
    assert "PRDP Human Choice Reward" in CLI_REFUSAL
