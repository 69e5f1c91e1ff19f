"""Pictures for people: the reward curve and a before/after grid (PIL only, no matplotlib)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
LINE = (31, 119, 180)
BAND = (198, 219, 239)
HELD_OUT = (214, 96, 39)


def label_font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1
        return ImageFont.load_default()


def reward_curve(metrics: Sequence[dict], width: int = 640, height: int = 360,
                 title: str = "reward per epoch (mean ± std)") -> Image.Image:
    """Line plot of reward_mean per epoch with a ±std band, and the held-out reward
    (`eval/reward_mean`, heldout.py) as a second line where epochs have one."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = label_font(13)
    left, right, top, bottom = 70, width - 20, 35, height - 45
    draw.text((left, 10), title, fill=INK, font=font)
    draw.rectangle([left, top, right, bottom], outline=INK)
    if not metrics:
        draw.text((left + 10, (top + bottom) // 2), "no epochs yet", fill=INK, font=font)
        return image
    epochs = [float(m["epoch"]) for m in metrics]
    means = np.array([float(m["reward_mean"]) for m in metrics])
    stds = np.array([float(m.get("reward_std", 0.0)) for m in metrics])
    held_out = [(float(m["epoch"]), float(m["eval/reward_mean"])) for m in metrics if "eval/reward_mean" in m]
    low, high = float((means - stds).min()), float((means + stds).max())
    if held_out:
        values = [v for _, v in held_out]
        low, high = min(low, min(values)), max(high, max(values))
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    pad = 0.05 * (high - low)
    low, high = low - pad, high + pad
    x_min, x_max = min(epochs), max(epochs)
    span = (x_max - x_min) or 1.0

    def to_xy(epoch: float, value: float):
        x = left + (epoch - x_min) / span * (right - left) if len(epochs) > 1 else (left + right) / 2
        y = bottom - (value - low) / (high - low) * (bottom - top)
        return x, y

    band = [to_xy(e, m + s) for e, m, s in zip(epochs, means, stds)]
    band += [to_xy(e, m - s) for e, m, s in reversed(list(zip(epochs, means, stds)))]
    if len(band) > 2:
        draw.polygon(band, fill=BAND)
    points = [to_xy(e, m) for e, m in zip(epochs, means)]
    if len(points) > 1:
        draw.line(points, fill=LINE, width=2)
    for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=LINE)
    if held_out:
        held_points = [to_xy(e, v) for e, v in held_out]
        if len(held_points) > 1:
            draw.line(held_points, fill=HELD_OUT, width=2)
        for x, y in held_points:
            draw.rectangle([x - 3, y - 3, x + 3, y + 3], fill=HELD_OUT)
        legend_x = max(left + 10, right - 170)
        draw.line([(legend_x, top + 12), (legend_x + 18, top + 12)], fill=LINE, width=2)
        draw.text((legend_x + 24, top + 5), "training", fill=INK, font=font)
        draw.line([(legend_x, top + 28), (legend_x + 18, top + 28)], fill=HELD_OUT, width=2)
        draw.text((legend_x + 24, top + 21), "held-out", fill=INK, font=font)
    for value in (low + pad, (low + high) / 2, high - pad):
        _, y = to_xy(x_min, value)
        draw.text((5, y - 7), f"{value:.4g}", fill=INK, font=font)
    for tick in epoch_ticks(x_min, x_max):
        x, _ = to_xy(tick, low)
        draw.line([(x, bottom), (x, bottom + 4)], fill=INK, width=1)
        label = f"{tick:g}"
        draw.text((x - 3 * len(label), bottom + 8), label, fill=INK, font=font)
    draw.text(((left + right) // 2 - 15, bottom + 24), "epoch", fill=INK, font=font)
    return image


def epoch_ticks(first: float, last: float, most: int = 6) -> List[float]:
    """Up to `most` round, evenly spaced epoch numbers from first to last (both included)."""
    if last <= first:
        return [first]
    span = last - first
    step = next(s for s in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 10 ** 9)
                if span / s <= most - 1)
    ticks = [first] + [t for t in range(int(first // step + 1) * step, int(last), step) if last - t >= step / 2]
    return ticks + [last]


def to_pil(image: torch.Tensor) -> Image.Image:
    """[H, W, 3] float 0..1 -> PIL RGB."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def comparison_grid(rows: List[torch.Tensor], row_labels: List[str],
                    scores: Optional[List[torch.Tensor]] = None, cell: int = 128) -> Image.Image:
    """Rows of images [n, H, W, 3] (e.g. before / after, same seeds) with labels and scores."""
    columns = max(len(r) for r in rows)
    label_width, caption = 90, 16
    grid = Image.new("RGB", (label_width + columns * cell, len(rows) * (cell + caption)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = label_font(12)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        top = r * (cell + caption)
        draw.text((5, top + cell // 2 - 6), label, fill=INK, font=font)
        for c, image in enumerate(images):
            tile = to_pil(image).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (label_width + c * cell, top))
            if scores is not None:
                draw.text((label_width + c * cell + 3, top + cell + 1), f"{float(scores[r][c]):.4g}",
                          fill=INK, font=font)
    return grid


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL -> [1, H, W, 3] float 0..1 (ComfyUI's IMAGE layout)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
