"""Text written into images (score labels, preview captions) that always fits: the font shrinks
to a floor and then the text is shortened with '…', so nothing is cut at the image's edge."""
from __future__ import annotations

from typing import List

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MIN_FONT_PX = 8
ELLIPSIS = "…"


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def text_width(draw: ImageDraw.ImageDraw, text: str, size: int) -> float:
    return draw.textlength(text, font=font(size))


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: int, size: int, keep_end: str = "") -> tuple:
    """(text, font size) that fits in `width` px: a smaller font first (down to MIN_FONT_PX),
    then the head of `text` shortened with '…' (`keep_end`, e.g. a score, is always kept)."""
    for candidate in range(size, MIN_FONT_PX - 1, -1):
        if text_width(draw, text + keep_end, candidate) <= width:
            return text + keep_end, candidate
    size = MIN_FONT_PX
    head = text
    while head and text_width(draw, head + ELLIPSIS + keep_end, size) > width:
        head = head[:-1]
    if head:
        return head + ELLIPSIS + keep_end, size
    return (keep_end.strip() or text[:1] + ELLIPSIS), size


def to_pil(image: torch.Tensor) -> Image.Image:
    """[H, W, C] 0..1 -> RGB PIL image."""
    array = (image[..., :3].detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")


def to_tensor(picture: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)


def caption_above(picture: Image.Image, lines: List[str], size: int = 12) -> Image.Image:
    """The picture with a dark band above it holding `lines` (each fitted to the width)."""
    probe = ImageDraw.Draw(picture)
    fitted = [fit_text(probe, line, picture.width - 6, size) for line in lines]
    line_height = max((s for _, s in fitted), default=size) + 4
    band = line_height * len(fitted) + 4
    out = Image.new("RGB", (picture.width, picture.height + band), (24, 24, 24))
    out.paste(picture, (0, band))
    draw = ImageDraw.Draw(out)
    for index, (text, text_size) in enumerate(fitted):
        draw.text((3, 2 + index * line_height), text, fill=(235, 235, 235), font=font(text_size))
    return out
