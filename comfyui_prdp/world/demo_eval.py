"""The demo's evaluation on UNSEEN prompts: the fixed (prompt, seed) rows (every image its own
seed), the paired statistics over independent units, held_out.json and the captioned
before/after grid."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from PIL import Image, ImageDraw

from ..evaluation import distinct_seed_rows, paired_statistics   # noqa: F401  (paired_statistics: benchmarks)
from .grammar import held_out_prompts, sample_prompts, train_prompts

EVAL_PROMPT_COUNT = 8
#: images per unseen caption, each with its own seed (evaluation.distinct_seed_rows from FIRST_EVAL_SEED)
EVAL_IMAGES_PER_PROMPT = 4
FIRST_EVAL_SEED = 1000


def eval_prompts(seed: int = 0) -> List[str]:
    """EVAL_PROMPT_COUNT held-out captions (never trained on, never pretrained on)."""
    return sample_prompts(held_out_prompts(), EVAL_PROMPT_COUNT, seed)


def eval_rows(seed: int = 0) -> Tuple[List[str], List[int]]:
    """(row prompts, row seeds) of the unseen-caption evaluation: every image its own seed."""
    return distinct_seed_rows(eval_prompts(seed), EVAL_IMAGES_PER_PROMPT, FIRST_EVAL_SEED)


def demo_train_prompts() -> List[str]:
    return train_prompts()


def held_out_record(row_prompts: Sequence[str], row_seeds: Sequence[int], before: torch.Tensor,
                    after: torch.Tensor) -> dict:
    """held_out.json: per image (the same order in every list) and the summary, whose n and unit
    say what the paired statistic counts (evaluation.paired_statistics)."""
    values = torch.cat([before, after])
    if not torch.isfinite(values).all():
        raise ValueError("held-out rewards contain non-finite values; the reward model is broken")
    return {"prompts": list(row_prompts), "seeds": [int(s) for s in row_seeds],
            "rewards_before": [float(v) for v in before], "rewards_after": [float(v) for v in after],
            "unseen_prompts": list(dict.fromkeys(row_prompts)),
            "summary": paired_statistics(before, after, row_seeds)}


GUARD_REWARD = "world-alignment"


def alignment_guard(row_prompts: Sequence[str], row_seeds: Sequence[int], before_images: torch.Tensor,
                    after_images: torch.Tensor) -> Dict[str, object]:
    """The world-alignment of the same before/after images (paired statistics): when a run trains
    another reward, this shows whether the images still follow their captions (reward hacking)."""
    from ..rewards.world import WorldAlignmentReward

    scorer = WorldAlignmentReward()
    rows = list(row_prompts)
    before, after = scorer.score(before_images, rows), scorer.score(after_images, rows)
    if not torch.isfinite(torch.cat([before, after])).all():
        raise ValueError("the world-alignment guard gave non-finite scores; the scorer is broken")
    return paired_statistics(before, after, row_seeds)


def units_text(stats: Dict[str, object]) -> str:
    """What n counts: 'n = 16 images, each with its own seed' or 'n = 4 seeds (4 images each averaged)'."""
    if stats["images"] == stats["n"]:
        return f"n = {stats['n']} images, each with its own seed"
    return f"n = {stats['n']} seeds ({stats['images'] / stats['n']:g} images each averaged)"


def guard_line(stats: Dict[str, object]) -> str:
    return (f"{GUARD_REWARD} of the same images (does the caption still hold?): {stats['mean_before']:+.4f} -> "
            f"{stats['mean_after']:+.4f}, paired t = {stats['paired_t']:.2f} over {units_text(stats)}, "
            f"gain = {stats['gain_in_std']:.2f} std")


def write_json(path: Path, record: dict) -> None:
    from ..lora.files import atomic_write

    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))


def summary_lines(stats: Dict[str, object], label: str = "unseen prompts") -> List[str]:
    return [f"{label} ({stats['images']} images, the same seeds before and after): reward "
            f"{stats['mean_before']:+.4f} -> {stats['mean_after']:+.4f}, improved on "
            f"{100 * stats['improved_fraction']:.0f} % of {stats['n']} units",
            f"paired t = {stats['paired_t']:.2f} over {units_text(stats)} ({stats['degrees_of_freedom']} df), "
            f"gain = {stats['gain_in_std']:.2f} std (std of the units before training)"]


def captioned_grid(prompts: Sequence[str], per_prompt: int, before_images: torch.Tensor,
                   after_images: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                   cell: int = 64) -> Image.Image:
    """One row per prompt (its `per_prompt` images, prompt-major): its caption, then before |
    after for each image, scores under each."""
    n_seeds = per_prompt
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
