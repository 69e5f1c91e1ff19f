"""Every shipped workflow has the thumbnail ComfyUI's template browser asks for
(/api/workflow_templates/comfyui-prdp/<name>.jpg): a real, small JPEG with a title drawn by
scripts/make_template_thumbnails.py. The server side is in test_comfy_frontend.py."""
import importlib.util
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
MAX_BYTES = 60_000


def thumbnail_script():
    spec = importlib.util.spec_from_file_location("make_template_thumbnails",
                                                  REPO / "scripts" / "make_template_thumbnails.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_each_workflow_has_a_small_real_jpeg_thumbnail(workflow):
    path = workflow.with_suffix(".jpg")
    assert path.is_file(), f"no {path.name}: run scripts/make_template_thumbnails.py <world demo run folder>"
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size} bytes"
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.size == thumbnail_script().SIZE
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 500, f"{path.name} is not a picture"


def test_every_workflow_has_a_title_and_one_is_marked_to_start_with():
    script = thumbnail_script()
    assert {p.stem for p in WORKFLOWS} <= set(script.TITLES)
    assert script.START_HERE in script.TITLES and "start here" in script.TITLES[script.START_HERE][0].lower()
