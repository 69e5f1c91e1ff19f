"""The real ComfyUI frontend in headless Chromium: the example workflows load without missing
node types, the frontend's own graph -> prompt conversion agrees with the harness converter,
and a workflow queued from the page trains and finishes on the CPU.

Needs ComfyUI, Debian's Chromium (/usr/bin/chromium, or env PRDP_CHROMIUM; see
scripts/install_chromium.sh) and the `playwright` Python package, driven with
executable_path (never `playwright install`); skipped with the reason otherwise.
"""
from __future__ import annotations

import json

import pytest

import comfy_harness as harness
from comfy_harness import workflow_to_api_prompt

WORKFLOW_FILES = harness.workflow_files()
PRDP_NODES = ("PRDPLoadRewardModel", "PRDPTrainLoRA", "PRDPApplyLoRA", "PRDPScoreImages")

pytestmark = pytest.mark.usefixtures("browser_ready")   # skips before the shared server starts


@pytest.fixture(scope="module")
def page(server):
    """The ComfyUI page, loaded once for the module; console errors collected in page.errors."""
    with harness.headless_chromium() as browser:
        context, page = harness.open_comfy_page(browser, server.base_url, 1600, 1000)
        yield page
        context.close()


def load_workflow(page, workflow: dict) -> dict:
    """Load a UI workflow into the page; returns {missing: [...], serialized: {...}}."""
    return page.evaluate(
        """async (workflow) => {
            await window.app.loadGraphData(workflow, true, true, null);
            await new Promise(r => setTimeout(r, 300));
            const missing = window.app.graph.nodes
                .filter(n => !(n.type in LiteGraph.registered_node_types))
                .map(n => n.type);
            return {missing, serialized: window.app.graph.serialize()};
        }""", workflow)


def frontend_prompt(page) -> dict:
    return page.evaluate("async () => (await window.app.graphToPrompt()).output")


def _page_lines(page, predicate) -> str:
    text = page.evaluate("() => document.body.innerText")
    return "\n".join(line for line in text.splitlines() if predicate(line.lower()))


def missing_nodes_dialog_text(page) -> str:
    """What the page says about missing node types (not about missing model files, which the
    1.3x+ frontends also report, e.g. for a workflow's default checkpoint)."""
    return _page_lines(page, lambda line: ("missing" in line or "not found" in line)
                       and "node" in line and "model" not in line)


def missing_models_text(page) -> str:
    return _page_lines(page, lambda line: "missing" in line and ("model" in line or ".safetensors" in line))


def _strip_meta(prompt: dict) -> dict:
    return {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in prompt.items()}


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=[p.stem for p in WORKFLOW_FILES])
def test_workflow_loads_in_the_frontend_and_converts_like_it(page, object_info, path):
    missing_types = [n for n in PRDP_NODES if n not in object_info]
    assert not missing_types, f"the server lacks {missing_types}"
    loaded = load_workflow(page, json.loads(path.read_text()))
    assert not loaded["missing"], f"{path.name}: missing node types in the frontend: {loaded['missing']}"
    assert not missing_nodes_dialog_text(page), missing_nodes_dialog_text(page)
    if missing_models_text(page):
        print(f"{path.name}: the frontend reports missing models: {missing_models_text(page)!r}")
    ours = workflow_to_api_prompt(loaded["serialized"], object_info)
    theirs = frontend_prompt(page)
    assert _strip_meta(ours) == _strip_meta(theirs)
    # the file as saved in the repository converts to the same prompt as the frontend's re-save
    assert _strip_meta(workflow_to_api_prompt(json.loads(path.read_text()), object_info)) == _strip_meta(theirs)


def test_missing_node_types_are_detected(page, object_info):
    """Control for the two checks above: an unknown node type is reported by both."""
    workflow = harness.core_ui_workflow(object_info, harness.TINY_SD15_FILENAME)
    workflow["nodes"][0]["type"] = "PRDPNoSuchNode"
    loaded = load_workflow(page, workflow)
    try:
        assert loaded["missing"] == ["PRDPNoSuchNode"], loaded["missing"]
        page.wait_for_timeout(500)
        assert missing_nodes_dialog_text(page), _page_lines(page, lambda line: True)[:3000]
    finally:
        page.keyboard.press("Escape")
        load_workflow(page, harness.core_ui_workflow(object_info, harness.TINY_SD15_FILENAME))


def test_hand_made_graph_with_reroute_primitive_bypass_and_mute_converts_like_the_frontend(page, object_info):
    loaded = load_workflow(page, harness.core_ui_workflow(object_info, harness.TINY_SD15_FILENAME))
    assert not loaded["missing"]
    theirs = frontend_prompt(page)
    assert _strip_meta(workflow_to_api_prompt(loaded["serialized"], object_info)) == _strip_meta(theirs)
    sampler = harness.nodes_of_type(theirs, "KSampler")[0]
    assert theirs[sampler]["inputs"]["seed"] == 11  # the PrimitiveNode's value


def test_train_and_compare_queued_from_the_frontend(server, page, object_info, tmp_path):
    name = "Train and compare SD1.5 with PickScore"
    if name not in {p.stem for p in WORKFLOW_FILES}:
        pytest.skip(f"no example workflow named {name}.json")
    # as the template browser does: fetch the served template, then load it
    workflow = page.evaluate(
        """async (url) => { const r = await fetch(url); if (!r.ok) throw new Error(r.status); return await r.json(); }""",
        f"/api/workflow_templates/{harness.PACKAGE_LINK_NAME}/{name}.json")
    loaded = load_workflow(page, workflow)
    assert not loaded["missing"], loaded["missing"]
    problems = harness.set_page_widgets(page, {
        "CheckpointLoaderSimple": {"ckpt_name": harness.TINY_SD15_FILENAME},
        "EmptyLatentImage": {"width": harness.TINY_IMAGE_SIZE, "height": harness.TINY_IMAGE_SIZE},
        "KSampler": {"steps": 2},
        "PRDPLoadRewardModel": {"reward": "jpeg-compressibility", "weights": "(auto)", "device": "cpu"},
        "PRDPTrainLoRA": {**harness.TINY_TRAINING, "epochs": 1, "lora_name": "harness_frontend"},
    })
    assert not problems, problems
    loras_before = set(server.loras_dir.rglob("*.safetensors"))
    prompt_id = harness.queue_from_page(server.base_url, page)
    result = harness.wait_for(server.base_url, prompt_id, timeout=600)
    page.wait_for_timeout(500)
    page.screenshot(path=str(tmp_path / "train_and_compare.png"), full_page=True)
    assert result.status == "success", result.describe() + "\n" + server.log_tail()
    assert set(server.loras_dir.rglob("*.safetensors")) - loras_before, "no LoRA written"
    queued = result.history.get("prompt", [None, None, {}])[2]
    trains = harness.nodes_of_type(queued, "PRDPTrainLoRA")
    assert trains and queued[trains[0]]["inputs"]["epochs"] == 1
    assert (tmp_path / "train_and_compare.png").stat().st_size > 10_000
    print(f"screenshot: {tmp_path / 'train_and_compare.png'}")


def test_web_extension_is_registered_without_page_errors(page):
    web_files = sorted((harness.REPO_ROOT / "web").glob("*.js"))
    if not web_files:
        pytest.skip("the package has no web/*.js extension")
    names = page.evaluate("() => (window.app.extensions || []).map(e => e.name)")
    assert any("prdp" in name.lower() for name in names), names
    ours = [e for e in page.errors if "prdp" in e.lower() or "comfyui-prdp" in e]
    assert not ours, ours


def test_the_template_browser_finds_a_thumbnail_for_every_workflow(server, page):
    """The frontend lists custom-node templates by file name and asks for <name>.jpg beside each
    (a 404 leaves an empty card and a console error)."""
    listed = page.evaluate("async () => (await (await fetch('/api/workflow_templates')).json())")
    names = listed.get(harness.PACKAGE_LINK_NAME, [])
    assert sorted(names) == sorted(p.stem for p in WORKFLOW_FILES), listed
    for name in names:
        status, kind = page.evaluate(
            "async (url) => { const r = await fetch(url); return [r.status, r.headers.get('content-type')]; }",
            f"/api/workflow_templates/{harness.PACKAGE_LINK_NAME}/{name}.jpg")
        assert status == 200 and kind.startswith("image/jpeg"), (name, status, kind)
