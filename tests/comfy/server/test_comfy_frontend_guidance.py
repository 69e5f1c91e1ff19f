"""What the real frontend shows a new user before they train (issue 22, sections 3-5), in headless
Chromium on every ComfyUI tree, classic canvas and Nodes 2.0:

* a workflow whose model file is missing offers that model's download (URL and folder from the
  workflow's `models` list) — and the control: without the list there is no download to offer;
* Load Reward Model shows only the widgets the chosen reward uses (web/prdp_reward_widgets.js),
  in the drawn node, not only in its flags;
* the template browser lists the workflows under their human titles, with a thumbnail each.

Screenshots go to /tmp/prdp-screens/ (env PRDP_SCREENS) for a person to look at.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from pathlib import Path

import pytest

import comfy_harness as harness

SCREENS = Path(os.environ.get("PRDP_SCREENS", "/tmp/prdp-screens"))
RENDERERS = {"classic": False, "nodes2": True}
SD15_WORKFLOW = "Train and compare SD1.5 with PickScore"
START_HERE = "Start here - Quick test with the JPEG reward"
REWARD_NODE = "PRDPLoadRewardModel"
#: widgets that only model rewards use: hidden for the JPEG reward
MODEL_ONLY_WIDGETS = ("weights", "dtype", "allow_download", "server_url")


pytestmark = pytest.mark.usefixtures("browser_ready", "user_settings_restored")   # the shared server


@pytest.fixture(scope="module")
def browser(server):
    with harness.headless_chromium() as instance:
        yield instance


@contextlib.contextmanager
def page_with(server, browser, vue: bool, width: int = 1400, height: int = 1000):
    """A fresh page, Nodes 2.0 on or off and the missing-models warning at its default (on),
    both set before the frontend starts (as saved user settings)."""
    harness.http_json("POST", f"{server.base_url}/settings/Comfy.VueNodes.Enabled", vue)
    harness.http_json("POST", f"{server.base_url}/settings/Comfy.Workflow.ShowMissingModelsWarning", True)
    context, page = harness.open_comfy_page(browser, server.base_url, width, height)
    try:
        page.wait_for_timeout(800)
        yield page
    finally:
        context.close()


def screenshot(page, name: str) -> None:
    SCREENS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENS / f"{name}.png"))


def shipped_workflow(name: str) -> dict:
    return json.loads((harness.REPO_ROOT / "example_workflows" / f"{name}.json").read_text())


def missing_model_report(page, workflow: dict) -> str:
    """Load the workflow and return what the frontend says about missing models: the dialog of
    frontend 1.2x, or the details panel behind the 1.3x+ error toast ("View details"), with the
    href or title of every link in it (1.2x's "Download" carries the URL). Returns (report,
    whether it came from the 1.3x+ details panel)."""
    page.evaluate("async (w) => { await window.app.loadGraphData(w, true, true, null); }", workflow)
    page.wait_for_timeout(2000)
    details = page.get_by_text("View details")
    panel = details.count() > 0
    if panel:
        details.first.click()
        page.wait_for_timeout(1200)
    return panel, page.evaluate("""() => {
        const text = document.body.innerText;
        const links = [...document.querySelectorAll('a[href], [title]')].map(a => a.href || a.title);
        return text + '\\n' + links.join('\\n');
    }""")


def download_buttons(report: str) -> list[str]:
    """The download buttons' labels: "Download" / "Download all" (1.3x+), "Download (?)" (1.2x);
    not the 1.3x panel's standing hint "Download a model, or open the node to replace it"."""
    return [line for line in map(str.strip, report.splitlines())
            if line in ("Download", "Download all") or line.startswith("Download (")]


@pytest.mark.parametrize("renderer", RENDERERS)
def test_a_missing_model_is_offered_for_download(server, browser, renderer, comfyui_tree):
    workflow = shipped_workflow(SD15_WORKFLOW)
    checkpoint = next(n for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple")
    (model,) = checkpoint["properties"]["models"]
    with page_with(server, browser, RENDERERS[renderer]) as page:
        panel, report = missing_model_report(page, workflow)
        screenshot(page, f"missing-model-{comfyui_tree.version}-{renderer}")
    assert model["name"] in report, report[-2000:]
    assert download_buttons(report), f"the frontend offers no download for {model['name']}:\n{report[-2000:]}"
    if not panel:
        # frontend 1.2x: the dialog's Download is a link to the workflow's URL
        assert model["url"] in report, report[-2000:]

    if renderer != "classic":
        return      # the control below does not depend on the renderer: once per tree
    # control: the same workflow without the `models` list names the file but offers nothing
    bare = copy.deepcopy(workflow)
    for node in bare["nodes"]:
        node.get("properties", {}).pop("models", None)
    bare.pop("models", None)
    with page_with(server, browser, RENDERERS[renderer]) as page:
        _, report = missing_model_report(page, bare)
    assert model["url"] not in report
    assert not download_buttons(report), report[-2000:]


def reward_node_layout(page) -> list[dict]:
    """Per Load Reward Model node: its reward, height, hidden widgets and (Nodes 2.0) the text
    its DOM element shows."""
    return page.evaluate("""(type) => window.app.graph.nodes.filter(n => n.type === type).map(n => ({
        reward: n.widgets.find(w => w.name === 'reward').value,
        height: (n.boundingRect ?? n.size)[3] ?? n.size[1],   // as drawn (1.2x keeps size, draws smaller)
        hidden: n.widgets.filter(w => w.hidden).map(w => w.name),
        rows: n.widgets.filter(w => !w.hidden).map(w => w.y ?? w.last_y ?? null),
        dom: document.querySelector(`[data-node-id="${n.id}"]`)?.innerText ?? null,
    }))""", REWARD_NODE)


def set_reward(page, index: int, reward: str) -> None:
    page.evaluate("""([type, index, reward]) => {
        const node = window.app.graph.nodes.filter(n => n.type === type)[index];
        const widget = node.widgets.find(w => w.name === 'reward');
        widget.value = reward;
        widget.callback?.(reward);
        window.app.canvas.setDirty(true, true);
    }""", [REWARD_NODE, index, reward])
    page.wait_for_timeout(800)


def frontend_version(page) -> tuple:
    text = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || ''")
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3]) or (0,)


@pytest.mark.parametrize("renderer", RENDERERS)
def test_load_reward_model_shows_only_the_widgets_its_reward_uses(server, browser, renderer, comfyui_tree):
    vue = RENDERERS[renderer]
    with page_with(server, browser, vue, 1000, 600) as page:
        if vue and frontend_version(page) < (1, 28):
            pytest.skip("frontend 1.27's early Nodes 2.0 renderer does not redraw a node when an extension changes "
                        "its widgets (neither values nor hidden flags); the classic canvas hides them there")
        page.evaluate("""(type) => {
            window.app.graph.clear();
            for (const x of [100, 500]) { const n = LiteGraph.createNode(type); n.pos = [x, 100]; window.app.graph.add(n); }
            const ds = window.app.canvas.ds; ds.scale = 1; ds.offset[0] = 0; ds.offset[1] = 0;
            window.app.canvas.setDirty(true, true);
        }""", REWARD_NODE)
        page.wait_for_timeout(800)
        set_reward(page, 0, "pickscore")
        set_reward(page, 1, "jpeg-compressibility")
        screenshot(page, f"reward-widgets-{comfyui_tree.version}-{renderer}")
        model_reward, jpeg = reward_node_layout(page)
        set_reward(page, 1, "aesthetic")
        (_, back) = reward_node_layout(page)

    assert not set(MODEL_ONLY_WIDGETS) & set(model_reward["hidden"]), model_reward
    rows = model_reward["rows"]
    if not vue and None not in rows:
        # drawn one under the other: no empty row where a hidden widget (`components`) sits
        steps = [b - a for a, b in zip(rows, rows[1:])]
        assert max(steps) < 1.5 * min(steps), (rows, model_reward)
    assert set(MODEL_ONLY_WIDGETS) <= set(jpeg["hidden"]), jpeg
    # drawn smaller, not only flagged: both renderers size the node from its visible widgets
    assert jpeg["height"] < model_reward["height"] - 3 * 20, (jpeg, model_reward)
    if vue and jpeg["dom"] is not None:
        shown = model_reward["dom"]
        assert all(name in shown for name in MODEL_ONLY_WIDGETS), shown
        assert not any(name in jpeg["dom"] for name in MODEL_ONLY_WIDGETS), jpeg["dom"]
    # choosing a model reward again brings them back
    assert not set(MODEL_ONLY_WIDGETS) & set(back["hidden"]), back


def test_the_template_browser_shows_human_titles_with_thumbnails(server, browser, comfyui_tree):
    workflows = sorted(p.stem for p in harness.workflow_files())
    assert START_HERE in workflows
    assert all(" " in name and "_" not in name for name in workflows), \
        f"example workflow files are listed by their names: give each a human title ({workflows})"
    with page_with(server, browser, False) as page:
        page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
        page.wait_for_timeout(2000)
        page.get_by_text(harness.PACKAGE_LINK_NAME, exact=True).first.click()
        page.wait_for_timeout(2500)
        screenshot(page, f"templates-{comfyui_tree.version}")
        text = page.evaluate("() => document.querySelector('[role=dialog], .p-dialog')?.innerText ?? ''")
        # the frontends load thumbnails lazily, as blob: URLs; ours are the only 400 x 300 images
        thumbnails = page.evaluate("""() => [...document.querySelectorAll('img')]
            .filter(i => i.naturalWidth === 400 && i.naturalHeight === 300).length""")
    shown = " ".join(text.split())
    # titles as the frontend writes them (some frontends turn " - " into " ")
    missing = [name for name in workflows if name not in shown and name.replace(" - ", " ") not in shown]
    assert not missing, f"titles not in the template browser: {missing}\n{shown[:1500]}"
    assert thumbnails >= min(4, len(workflows)), f"{thumbnails} thumbnails drawn"
