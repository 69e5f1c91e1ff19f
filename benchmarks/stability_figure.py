"""The picture of benchmarks/stability.py: the unseen-prompt reward curve of every run (one panel
per prompt-set size, one colour per algorithm) above a grid of each run's unseen-prompt samples
(the base model's first), PIL only."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from PIL import Image, ImageDraw

from comfyui_prdp.runs.plots import label_font, to_pil

COLOURS = {"prdp": (31, 119, 180), "ddpo": (214, 39, 40), "prdp-noclip": (44, 160, 44)}
INK, GRID = (30, 30, 30), (225, 225, 225)
PANEL_W, PANEL_H, CELL, LABEL_W = 460, 300, 40, 190
GRID_PROMPTS = 4


def curve_panel(rows: Sequence[dict], title: str, low: float, high: float) -> Image.Image:
    image = Image.new("RGB", (PANEL_W, PANEL_H), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = label_font(12)
    left, right, top, bottom = 60, PANEL_W - 15, 30, PANEL_H - 40
    draw.text((left, 8), title, fill=INK, font=font)
    draw.rectangle([left, top, right, bottom], outline=INK)
    last_epoch = max([point["epoch"] for row in rows for point in row["curve"]] + [1])

    def xy(epoch: float, value: float):
        return (left + epoch / last_epoch * (right - left),
                bottom - (value - low) / (high - low) * (bottom - top))

    for value in (low, (low + high) / 2, high):
        _, y = xy(0, value)
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((4, y - 7), f"{value:.3f}", fill=INK, font=font)
    draw.text((right - 90, bottom + 20), f"epoch (0..{last_epoch})", fill=INK, font=font)
    for row in rows:
        colour = COLOURS.get(row["algorithm"], INK)
        points = [xy(p["epoch"], p["unseen_reward"]) for p in row["curve"]]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    for k, (name, colour) in enumerate(COLOURS.items()):     # the legend, under the plot
        x = left + 100 * k
        draw.line([(x, bottom + 27), (x + 18, bottom + 27)], fill=colour, width=2)
        draw.text((x + 22, bottom + 20), name, fill=INK, font=font)
    return image


def sample_grid(samples: Sequence[Tuple[str, torch.Tensor]], base_images: torch.Tensor, unseen) -> Image.Image:
    """One row per run (base first): the first GRID_PROMPTS unseen prompts x every seed."""
    columns = min(GRID_PROMPTS, len(unseen.prompts)) * len(unseen.seeds)
    rows = [("base model (no LoRA)", base_images)] + list(samples)
    shown = unseen.prompts[:GRID_PROMPTS]
    header = 16 * (len(shown) + 1)
    image = Image.new("RGB", (max(LABEL_W + columns * CELL + 10, 2 * PANEL_W), header + len(rows) * (CELL + 4)),
                      (250, 250, 250))
    draw = ImageDraw.Draw(image)
    font = label_font(11)
    draw.text((4, 2), f"samples on unseen prompts, {len(unseen.seeds)} seeds each, left to right:", fill=INK, font=font)
    for k, prompt in enumerate(shown):
        draw.text((14, 2 + 16 * (k + 1)), f"{k + 1}. {prompt}", fill=INK, font=font)
    for r, (label, images) in enumerate(rows):
        top = header + r * (CELL + 4)
        draw.text((4, top + CELL // 2 - 6), label, fill=INK, font=font)
        for c in range(columns):
            image.paste(to_pil(images[c]).resize((CELL, CELL), Image.NEAREST), (LABEL_W + c * CELL, top))
    return image


def stability_figure(rows: List[dict], samples, base_images: torch.Tensor, unseen) -> Image.Image:
    values = [p["unseen_reward"] for row in rows for p in row["curve"]]
    low, high = min(values), max(values)
    pad = max(1e-3, 0.05 * (high - low))
    panels = [curve_panel([r for r in rows if r["prompt_set"] == size],
                          f"unseen-prompt reward, {size} prompt set ({sizes[0]} prompts)", low - pad, high + pad)
              for size in ("small", "large")
              for sizes in [[r["prompt_set_size"] for r in rows if r["prompt_set"] == size] or [0]]]
    grid = sample_grid(samples, base_images, unseen)
    width = max(2 * PANEL_W, grid.width)
    figure = Image.new("RGB", (width, PANEL_H + grid.height + 10), (255, 255, 255))
    for k, panel in enumerate(panels):
        figure.paste(panel, (k * PANEL_W, 0))
    figure.paste(grid, (0, PANEL_H + 10))
    return figure
