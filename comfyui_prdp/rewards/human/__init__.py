"""The human reward: a person's choices among each prompt's images (issue 24).

choices.py: answers -> rewards (pure); ballots.py: the images, the open ballot and the record in
the run folder; reward.py: HumanReward, attached to a training run."""
from ..registry import register_reward
from .ballots import Ballot, BallotBox, read_preferences
from .choices import AnswerError, choices_to_rewards, parse_answer, with_assist
from .reward import ON_TIMEOUT, HumanReward

CLI_REFUSAL = ("the human reward asks a person to choose among each epoch's images in ComfyUI's "
               "dashboard (node 'PRDP Human Choice Reward' into PRDP Train LoRA); the command line "
               "cannot ask anyone: train it in ComfyUI, or choose another --reward")


def refuse_by_name(**options):
    """create_reward('human'): refused (the CLI and serve-reward have nobody to ask)."""
    raise ValueError(CLI_REFUSAL)


register_reward("human", refuse_by_name)


__all__ = ["Ballot", "BallotBox", "read_preferences", "AnswerError", "choices_to_rewards", "parse_answer",
           "with_assist", "ON_TIMEOUT", "HumanReward", "CLI_REFUSAL"]
