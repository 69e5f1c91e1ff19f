"""The demo's evaluation on UNSEEN prompts: the fixed prompt/seed set, the paired statistics,
held_out.json and the captioned before/after grid."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from PIL import Image, ImageDraw

from .grammar import held_out_prompts, sample_prompts, train_prompts

EVAL_PROMPT_COUNT = 8
EVAL_SEEDS = (1000, 1001, 1002, 1003)


def eval_prompts(seed: int = 0) -> List[str]:
    """EVAL_PROMPT_COUNT held-out captions (never trained on, never pretrained on)."""
    return sample_prompts(held_out_prompts(), EVAL_PROMPT_COUNT, seed)


def demo_train_prompts() -> List[str]:
    return train_prompts()


def paired_statistics(before: torch.Tensor, after: torch.Tensor) -> Dict[str, float]:
    """Paired t statistic of after - before (same prompt and seed) and the mean gain in units of
    the per-image std of the rewards before training."""
    before, after = before.double(), after.double()
    diff = after - before
    n = len(diff)
    diff_std = diff.std().item() if n > 1 else float("nan")
    t = diff.mean().item() / (diff_std / math.sqrt(n)) if n > 1 and diff_std > 0 else float("nan")
    spread = before.std().item() if n > 1 else float("nan")
    gain = diff.mean().item() / spread if n > 1 and spread > 0 else float("nan")
    return {"images": n, "mean_before": before.mean().item(), "mean_after": after.mean().item(),
            "mean_gain": diff.mean().item(), "paired_t": t, "gain_in_std": gain,
            "improved_fraction": (diff > 0).double().mean().item()}


def held_out_record(prompts: Sequence[str], seeds: Sequence[int], before: torch.Tensor,
                    after: torch.Tensor) -> dict:
    """held_out.json: per image (prompt-major, same order in every list) and the summary."""
    row_prompts = [p for p in prompts for _ in seeds]
    row_seeds = [int(s) for _ in prompts for s in seeds]
    values = torch.cat([before, after])
    if not torch.isfinite(values).all():
        raise ValueError("held-out rewards contain non-finite values; the reward model is broken")
    return {"prompts": row_prompts, "seeds": row_seeds, "rewards_before": [float(v) for v in before],
            "rewards_after": [float(v) for v in after], "unseen_prompts": list(prompts),
            "summary": paired_statistics(before, after)}


GUARD_REWARD = "world-alignment"


def alignment_guard(prompts: Sequence[str], seeds: Sequence[int], before_images: torch.Tensor,
                    after_images: torch.Tensor) -> Dict[str, float]:
    """The world-alignment of the same before/after images (paired statistics): when a run trains
    another reward, this shows whether the images still follow their captions (reward hacking)."""
    from .rewards import WorldAlignmentReward

    scorer = WorldAlignmentReward()
    rows = [p for p in prompts for _ in seeds]
    before, after = scorer.score(before_images, rows), scorer.score(after_images, rows)
    if not torch.isfinite(torch.cat([before, after])).all():
        raise ValueError("the world-alignment guard gave non-finite scores; the scorer is broken")
    return paired_statistics(before, after)


def guard_line(stats: Dict[str, float]) -> str:
    return (f"{GUARD_REWARD} of the same images (does the caption still hold?): {stats['mean_before']:+.4f} -> "
            f"{stats['mean_after']:+.4f}, paired t = {stats['paired_t']:.2f}, gain = {stats['gain_in_std']:.2f} std")


def write_json(path: Path, record: dict) -> None:
    from ..lora import atomic_write

    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))


def summary_lines(stats: Dict[str, float], label: str = "unseen prompts") -> List[str]:
    return [f"{label} ({stats['images']} images, same seeds): reward {stats['mean_before']:+.4f} -> "
            f"{stats['mean_after']:+.4f}, improved on {100 * stats['improved_fraction']:.0f} % of images",
            f"paired t = {stats['paired_t']:.2f}, gain = {stats['gain_in_std']:.2f} std (per-image std before training)"]


def captioned_grid(prompts: Sequence[str], seeds: Sequence[int], before_images: torch.Tensor,
                   after_images: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                   cell: int = 64) -> Image.Image:
    """One row per prompt: its caption, then before | after for each seed, scores under each."""
    n_seeds = len(seeds)
    caption_h, score_h, gap = 14, 12, 8
    width = n_seeds * (2 * cell + gap) + gap
    row_h = caption_h + cell + score_h + 4
    grid = Image.new("RGB", (width, 18 + len(prompts) * row_h), (250, 250, 250))
    draw = ImageDraw.Draw(grid)
    draw.text((gap, 2), "unseen prompts: before (left) | after (right) finetuning, same seed", fill=(20, 20, 20))
    for r, prompt in enumerate(prompts):
        top = 18 + r * row_h
        draw.text((gap, top), prompt, fill=(20, 20, 20))
        for s in range(n_seeds):
            i = r * n_seeds + s
            left = gap + s * (2 * cell + gap)
            for k, (images, scores) in enumerate(((before_images, before), (after_images, after))):
                array = (images[i].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
                grid.paste(Image.fromarray(array).resize((cell, cell), Image.NEAREST),
                           (left + k * cell, top + caption_h))
                draw.text((left + k * cell + 2, top + caption_h + cell), f"{float(scores[i]):.3f}", fill=(60, 60, 60))
    return grid
