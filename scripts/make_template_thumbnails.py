"""Draw example_workflows/<name>.jpg, the thumbnail ComfyUI's template browser shows for each
shipped workflow (it asks for /api/workflow_templates/comfyui-prdp/<name>.jpg).

Each thumbnail is the workflow's title over a real result of this engine from a CPU run:
before/after images of unseen prompts and the reward per epoch from a miniature-world demo run
(`bash scripts/run_demo.sh --world`, a run folder with before_after.png and metrics.jsonl). It is
not the output of the workflow's own model (SD1.5, SDXL, SD3.5 and Flux do not train on a CPU
in reasonable time), and the thumbnail says so. A workflow in PICTURES shows a screenshot of
this package's UI instead (the human reward's ballot: what that workflow is about).

    .venv/bin/python scripts/make_template_thumbnails.py runs/demo-YYYYMMDD-HHMMSS
    .venv/bin/python scripts/make_template_thumbnails.py --only "Teach by choosing - your picks as the reward"
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows"
SIZE = (400, 300)
QUALITY = 82
START_HERE = "Start here - Quick test with the JPEG reward"
HUMAN = "Teach by choosing - your picks as the reward"
#: name -> (title, one line on what it trains)
TITLES = {
    "Start here - Quick test with the JPEG reward": ("Quick test: start here", "SD1.5 · JPEG reward · no downloads"),
    "Train and compare SD1.5 with PickScore": ("Train and compare", "SD1.5 · PickScore"),
    "Train and compare SDXL with PickScore": ("Train and compare (SDXL)", "SDXL · PickScore"),
    "Train and compare SD3.5 with PickScore": ("Train and compare (SD3.5)", "SD3.5 · PickScore · flow SDE"),
    "Train and compare Flux with PickScore": ("Train and compare (Flux)", "Flux.1-dev · PickScore · flow SDE"),
    "Multi-reward PickScore HPSv2 aesthetic": ("Multi-reward training", "PickScore + HPSv2 + aesthetic"),
    "Compare a saved LoRA with the base": ("Compare a saved LoRA", "base vs. LoRA · PickScore"),
    HUMAN: ("Teach it your taste", "SD1.5 · your choices are the reward · no downloads"),
}
DEMO_NOTE = "images: PRDP on the embedded demo model, CPU run"
#: name -> (a screenshot taken by the tests, its note): shown instead of the demo's images
PICTURES = {
    HUMAN: (REPO / "docs" / "images" / "ballot-classic.png",
            "the dashboard's ballot (from the tests, tiny model)"),
}


def font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def demo_images(run: Path) -> Image.Image:
    """The header line and the first two prompt rows of the run's before|after grid."""
    grid = Image.open(run / "before_after.png").convert("RGB")
    band = grid.crop((0, 0, grid.width, min(grid.height, 14 + 2 * 94)))     # with its "before | after" line
    band.thumbnail((SIZE[0] - 16, 150))
    return band


def reward_curve(run: Path, box: tuple) -> Image.Image:
    """Mean reward per epoch of the run, as a small line plot."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    values = [row["reward_mean"] for row in rows]
    width, height = box
    plot = Image.new("RGB", box, (34, 34, 34))
    draw = ImageDraw.Draw(plot)
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    points = [(6 + i * (width - 12) / max(1, len(values) - 1), height - 6 - (v - low) / span * (height - 22))
              for i, v in enumerate(values)]
    draw.line(points, fill=(92, 204, 153), width=2)
    draw.text((6, 2), f"reward per epoch ({len(values)} epochs)", fill=(200, 200, 200), font=font(10))
    return plot


def picture_card(card: Image.Image, draw: ImageDraw.ImageDraw, name: str) -> Image.Image:
    """The screenshot of PICTURES[name], fitted below the title, and its note."""
    path, note = PICTURES[name]
    picture = Image.open(path).convert("RGB")
    picture.thumbnail((SIZE[0] - 16, SIZE[1] - 62 - 22), Image.Resampling.LANCZOS)
    card.paste(picture, ((SIZE[0] - picture.width) // 2, 62))
    draw.text((8, SIZE[1] - 16), note, fill=(150, 150, 150), font=font(10))
    return card


def thumbnail(name: str, run: Path | None) -> Image.Image:
    title, subtitle = TITLES[name]
    card = Image.new("RGB", SIZE, (24, 24, 24))
    draw = ImageDraw.Draw(card)
    if name == START_HERE:
        draw.rectangle((0, 0, SIZE[0], 6), fill=(92, 204, 153))
    draw.text((8, 10), title, fill=(255, 255, 255), font=font(22))
    draw.text((8, 40), subtitle, fill=(170, 210, 190), font=font(13))
    if name in PICTURES:
        return picture_card(card, draw, name)
    images = demo_images(run)
    card.paste(images, ((SIZE[0] - images.width) // 2, 62))
    top = 62 + images.height + 4
    curve = reward_curve(run, (SIZE[0] - 16, max(30, SIZE[1] - top - 20)))
    card.paste(curve, (8, top))
    draw.text((8, SIZE[1] - 16), DEMO_NOTE, fill=(150, 150, 150), font=font(10))
    return card


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, nargs="?",
                        help="a world-demo run folder (before_after.png, metrics.jsonl); not needed when every "
                             "workflow drawn (--only) shows a picture (PICTURES)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="draw only this workflow's thumbnail (repeatable); default: every workflow")
    args = parser.parse_args(argv)
    names = sorted(path.stem for path in WORKFLOWS.glob("*.json"))
    unknown = [name for name in names + args.only if name not in TITLES]
    if unknown:
        print(f"no title for {unknown}: add them to TITLES", file=sys.stderr)
        return 2
    names = [name for name in names if not args.only or name in args.only]
    needs_run = [name for name in names if name not in PICTURES]
    if needs_run:
        missing = ["a run folder"] if args.run is None else [
            f for f in ("before_after.png", "metrics.jsonl") if not (args.run / f).is_file()]
        if missing:
            print(f"{args.run or 'no run given'}: no {', '.join(missing)}; run `bash scripts/run_demo.sh --world` "
                  "and pass its runs/demo-* folder", file=sys.stderr)
            return 2
    pictures = [str(PICTURES[name][0]) for name in names if name in PICTURES and not PICTURES[name][0].is_file()]
    if pictures:
        print(f"no {', '.join(pictures)}: take it with tests/comfy/server/test_comfy_human_choice.py "
              "(/tmp/prdp-screens/) and copy it there", file=sys.stderr)
        return 2
    for name in names:
        target = WORKFLOWS / f"{name}.jpg"
        thumbnail(name, args.run).save(target, format="JPEG", quality=QUALITY, optimize=True)
        print(f"{target.relative_to(REPO)}: {target.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
