"""PRDP Human Choice Reward: the reward is a person's choice among each epoch's images, made in
PRDP Train LoRA's dashboard (engine: comfyui_prdp/rewards/human/; the ballot panel:
web/prdp_dashboard.js, web/prdp_ballot.js). PRDP Train LoRA attaches it to its run."""
from __future__ import annotations

from ..comfyui_prdp.rewards.human import ON_TIMEOUT, HumanReward
from .common import CATEGORY, REWARD_TYPE, refuse

TITLE = "PRDP Human Choice Reward"


class PRDPHumanChoiceReward:
    DESCRIPTION = ("Teach by choosing: after each epoch's sampling, PRDP Train LoRA's dashboard shows every "
                   "prompt's images and waits for you to mark the best and the worst (or rank them). Those "
                   "choices are the reward; they and the images are kept in the run folder "
                   "(preferences.jsonl, preferences/). Optionally an assist reward breaks ties and stands in "
                   "for prompts you skip. Use the preset human-quick.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "time_limit_minutes": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 1440.0, "step": 0.5,
                    "tooltip": "How long each epoch's ballot waits for your answer; 0: no limit."}),
                "on_timeout": (list(ON_TIMEOUT), {
                    "default": "wait",
                    "tooltip": "When the time limit passes: wait (keep waiting), skip (the epoch trains on "
                               "no pairs) or assist (the assist reward's scores stand in; needs an assist)."}),
                "assist_weight": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 100.0, "step": 0.05,
                    "tooltip": "Weight of the assist reward (0: off). Its scores, scaled to 0..1 within each "
                               "prompt's images, times this weight, are added to your choices (best 1, worst "
                               "-1): below 1 it only breaks ties and orders skipped prompts."}),
            },
            "optional": {
                "assist_reward": (REWARD_TYPE, {
                    "tooltip": "Optional: a reward from Load Reward Model (PRDP) that assists you."}),
            },
        }

    RETURN_TYPES = (REWARD_TYPE,)
    RETURN_NAMES = ("reward_model",)
    OUTPUT_TOOLTIPS = ("Your choices as the reward, for PRDP Train LoRA.",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, time_limit_minutes=None, on_timeout=None, assist_weight=None):
        problems = []
        if on_timeout == "assist" and isinstance(assist_weight, (int, float)) and assist_weight <= 0:
            problems.append("on_timeout 'assist' needs assist_weight above 0 and an assist_reward connected")
        refuse(TITLE, problems)
        return True

    def build(self, time_limit_minutes, on_timeout, assist_weight, assist_reward=None):
        try:
            reward = HumanReward(assist=assist_reward, assist_weight=float(assist_weight),
                                 time_limit=float(time_limit_minutes) * 60.0, on_timeout=on_timeout)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{TITLE}: {error}") from None
        return (reward,)
