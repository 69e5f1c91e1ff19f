"""The PRDP nodes (ComfyUI V1 API): thin forms over the engine in comfyui_prdp/."""
from .apply_lora import PRDPApplyLoRA
from .human_reward import PRDPHumanChoiceReward
from .load_reward import PRDPLoadRewardModel
from .score import PRDPScoreImages
from .train import PRDPTrainLoRA

NODE_CLASS_MAPPINGS = {
    "PRDPLoadRewardModel": PRDPLoadRewardModel,
    "PRDPTrainLoRA": PRDPTrainLoRA,
    "PRDPApplyLoRA": PRDPApplyLoRA,
    "PRDPScoreImages": PRDPScoreImages,
    "PRDPHumanChoiceReward": PRDPHumanChoiceReward,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "PRDPLoadRewardModel": "Load Reward Model (PRDP)",
    "PRDPTrainLoRA": "PRDP Train LoRA",
    "PRDPApplyLoRA": "Apply LoRA (PRDP)",
    "PRDPScoreImages": "Score Images (PRDP)",
    "PRDPHumanChoiceReward": "PRDP Human Choice Reward",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
