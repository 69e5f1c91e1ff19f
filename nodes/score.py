"""Score Images (PRDP): the reward of each image, shown on the node and written on the images;
with a `baseline` (another Score Images node's mean, e.g. the base model's) also the difference."""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from PIL import Image, ImageDraw

from .common import CATEGORY, REWARD_TYPE, refuse, widget_problems
from .image_text import fit_text, font, to_pil, to_tensor

MAX_LABEL_CHARS = 100


def prompts_for(prompt: str, count: int) -> List[str]:
    """One prompt for every image, or one line per image."""
    lines = [line.strip() for line in (prompt or "").splitlines() if line.strip()]
    if len(lines) <= 1:
        return [lines[0] if lines else ""] * count
    if len(lines) != count:
        raise ValueError(f"prompt has {len(lines)} lines but there are {count} images: give one prompt "
                         "for all images or one line per image")
    return lines


def format_scores(scores: torch.Tensor, label: str = "", components=None, baseline: Optional[float] = None) -> str:
    """'label: mean 0.1234 (n=2) [0.1, 0.2]', the difference to `baseline` when given, plus one
    line per component of a weighted reward. One fact per line, so it wraps on a narrow node."""
    head = f"{label}: " if label else ""
    mean = float(scores.mean())
    values = ", ".join(f"{float(s):.4f}" for s in scores)
    text = f"{head}mean {mean:.4f} (n={len(scores)})\n[{values}]"
    if baseline is not None:
        text += f"\nminus baseline {baseline:.4f}: {mean - baseline:+.4f}"
    for name, part in (components or {}).items():
        text += f"\n  {name}: mean {float(part.float().mean()):.4f}"
    return text


def annotate(images: torch.Tensor, scores: torch.Tensor, label: str = "") -> torch.Tensor:
    """The images with '<label> <score>' in a dark band at the bottom (same size). The text is
    fitted to the width: the label is shortened before the score is."""
    out = []
    for image, score in zip(images, scores):
        picture = to_pil(image).convert("RGBA")
        height = picture.height
        band = max(12, min(48, height // 10))
        overlay = Image.new("RGBA", picture.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        draw.rectangle([0, height - band, picture.width, height], fill=(0, 0, 0, 160))
        text, size = fit_text(draw, f"{label} " if label else "", picture.width - 4, max(8, int(band * 0.75)),
                              keep_end=f"{float(score):.4f}")
        draw.text((2, height - band + max(0, (band - size) // 2)), text, fill=(255, 255, 255, 255), font=font(size))
        out.append(to_tensor(Image.alpha_composite(picture, overlay)))
    return torch.stack(out)


class PRDPScoreImages:
    DESCRIPTION = ("Scores images with a reward model (e.g. the base and the finetuned model's images "
                   "side by side). Shows the scores on the node and outputs the mean, the scores as text "
                   "and the images with their score written on them.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "reward_model": (REWARD_TYPE, {"tooltip": "The reward, from Load Reward Model (PRDP)."}),
                "images": ("IMAGE", {"tooltip": "The images to score."}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "The prompt the images were made from: one for all, or one "
                                                 "line per image. Prompt-free rewards ignore it."}),
            },
            "optional": {
                "label": ("STRING", {"default": "", "tooltip": "A name shown with the scores, e.g. base."}),
                "baseline": ("FLOAT", {"forceInput": True,
                                       "tooltip": "Link another Score Images node's mean here (e.g. the base "
                                                  "model's) to show this batch's mean minus it."}),
            },
        }

    RETURN_TYPES = ("FLOAT", "STRING", "IMAGE")
    RETURN_NAMES = ("mean", "scores", "annotated")
    OUTPUT_TOOLTIPS = ("Mean reward of the batch.", "Every score as text.",
                       "The images with their score written at the bottom.")
    FUNCTION = "score"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def VALIDATE_INPUTS(cls, prompt=None, label=None):
        """True, or FormRefused (see nodes.common.FormRefused) for text that is not a prompt/label."""
        from ..comfyui_prdp.prompts import PromptTextError, parse_prompt_text

        problems = list(widget_problems(cls.INPUT_TYPES(), {"prompt": prompt, "label": label}).values())
        if isinstance(prompt, str):
            try:
                parse_prompt_text(prompt, "prompt")
            except PromptTextError as error:
                problems.append(str(error))
        if isinstance(label, str) and (len(label) > MAX_LABEL_CHARS or "\n" in label or "\x00" in label):
            problems.append(f"label: one line of at most {MAX_LABEL_CHARS} characters, e.g. base")
        refuse("Score Images (PRDP)", problems)
        return True

    def score(self, reward_model, images, prompt, label="", baseline=None):
        if images is None or images.dim() != 4 or images.shape[0] == 0:
            raise ValueError("images: expected a batch of images [B, H, W, C]")
        if baseline is not None and (isinstance(baseline, bool) or not isinstance(baseline, (int, float))
                                     or not math.isfinite(baseline)):
            raise ValueError(f"baseline={baseline!r}: link a finite number (another Score Images node's mean)")
        prompts = prompts_for(prompt, images.shape[0])
        reward_model.prepare()
        try:
            with torch.no_grad():
                scores, components = reward_model.score_with_components(images[..., :3], prompts)
        finally:
            reward_model.offload()
        scores = scores.detach().float().cpu()
        parts = components if len(components) > 1 else None
        text = format_scores(scores, label, parts, None if baseline is None else float(baseline))
        mean = float(scores.mean())
        return {"ui": {"text": [text]}, "result": (mean, text, annotate(images, scores, label))}
