"""The training dashboard (web/prdp.js) in the real ComfyUI frontend, headless Chromium, with
Nodes 2.0 (the Vue renderer, `Comfy.VueNodes.Enabled`) off and on:

* after one epoch the dashboard shows that epoch's reward (as the job reports it), a point on
  the curve, the epoch's samples with their rewards, and "finished: 1 of 1 epochs" with the LoRA;
* "preparing: ..." is shown with Stop enabled before training starts;
* Stop (the dashboard's button) ends the run gracefully: the prompt succeeds, a LoRA is written,
  and the node says "stopped at epoch k of n";
* Score Images shows its text in its own widget, with the finetuned-minus-base difference;
* the finished run stays shown (curve, samples, LoRA, Score Images' text) after a page reload
  and a workflow-tab switch, and a re-queue that ComfyUI answers from its cache says so;
* Stop before the first epoch ends says nothing was trained and writes no LoRA.

Screenshots go to the test's tmp dir and, for a person to look at, /tmp/prdp-screens/.
Needs ComfyUI, Debian's Chromium and the playwright package (never `playwright install`).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import pytest

import comfy_harness as harness

SCREENS = Path(os.environ.get("PRDP_SCREENS", "/tmp/prdp-screens"))
WORKFLOW = "Start here - Quick test with the JPEG reward"
RENDERERS = {"classic": False, "nodes2": True}


pytestmark = pytest.mark.usefixtures("browser_ready", "user_settings_restored")   # skips before the shared server starts


@pytest.fixture(scope="module")
def browser(server):
    with harness.headless_chromium() as instance:
        yield instance


def open_page(server, browser, vue: bool):
    """A fresh page with Nodes 2.0 set before the frontend starts (as a saved user setting)."""
    harness.http_json("POST", f"{server.base_url}/settings/Comfy.VueNodes.Enabled", vue)
    # the workflows name download links for their models: the frontend's "missing models" dialog
    # would cover the node (the tiny test checkpoint replaces the workflow's model)
    harness.http_json("POST", f"{server.base_url}/settings/Comfy.Workflow.ShowMissingModelsWarning", False)
    context, page = harness.open_comfy_page(browser, server.base_url, 1500, 1300)
    page.wait_for_timeout(500)
    assert page.evaluate("() => window.app.ui.settings.getSettingValue('Comfy.VueNodes.Enabled')") is vue
    return context, page


def frontend_version(page) -> tuple:
    text = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || ''")
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3]) or (0,)


def require_dom_widgets_in_vue(page, vue: bool) -> None:
    """Frontend 1.27 (pinned by ComfyUI 0.3.64) has an early Nodes 2.0 that renders only core
    widget types, so no extension's DOM widget shows there; say so instead of failing."""
    if vue and frontend_version(page) < (1, 28) and not page.evaluate(
            "() => !!document.querySelector('[data-prdp=dashboard]')?.isConnected"):
        pytest.skip(f"frontend {'.'.join(map(str, frontend_version(page)))}: its early Nodes 2.0 renderer draws "
                    "only core widget types (no extension DOM widgets); the classic canvas shows the dashboard")


def record_toasts(page) -> None:
    """Log every toast the page shows from now on (they vanish after seconds, often before the
    rest of the workflow has run)."""
    page.evaluate("""() => {
        window.prdpToasts = [];
        const service = window.app.extensionManager.toast;
        const add = service.add.bind(service);
        service.add = (message) => { window.prdpToasts.push(`${message.summary}: ${message.detail}`); return add(message); };
    }""")


def wait_for_toast(page, text: str) -> None:
    page.wait_for_function("(t) => window.prdpToasts.some(m => m.includes(t))", arg=text, timeout=15_000)


def load_quick_test(server, page, **train):
    """The shipped quick test, from the template route, with tiny CPU settings."""
    harness.load_template(page, harness.PACKAGE_LINK_NAME, WORKFLOW)
    problems = harness.set_page_widgets(page, {
            "CheckpointLoaderSimple": {"ckpt_name": harness.TINY_SD15_FILENAME},
            "EmptyLatentImage": {"width": harness.TINY_IMAGE_SIZE, "height": harness.TINY_IMAGE_SIZE},
            "KSampler": {"steps": 2},
            "PRDPLoadRewardModel": {"device": "cpu"},
            "PRDPTrainLoRA": {**harness.TINY_TRAINING, **train},
        })
    assert not problems, problems


def focus_train_node(page):
    """Put the train node at the top left at 100 % zoom (both renderers use the canvas transform)."""
    page.evaluate("""() => {
        const node = window.app.graph.nodes.find(n => n.type === 'PRDPTrainLoRA');
        const ds = window.app.canvas.ds;
        ds.scale = 1;
        ds.offset[0] = -node.pos[0] + 420; ds.offset[1] = -node.pos[1] + 60;
        window.app.canvas.setDirty(true, true);
    }""")
    page.wait_for_timeout(600)


def record_dashboard(page):
    """Log every (status text, Stop enabled) the dashboard shows, from now on."""
    page.evaluate("""() => {
        window.prdpSeen = [];
        const status = document.querySelector('[data-prdp=status]');
        const stop = document.querySelector('[data-prdp=stop]');
        const note = () => window.prdpSeen.push([status.textContent, !stop.disabled]);
        new MutationObserver(note).observe(document.querySelector('[data-prdp=dashboard]'),
            {subtree: true, childList: true, characterData: true, attributes: true});
    }""")


def dashboard(page) -> dict:
    return page.evaluate("""() => {
        const q = (k) => document.querySelector(`[data-prdp=${k}]`);
        return {status: q('status').textContent, metrics: q('metrics').textContent, message: q('message').textContent,
                stopEnabled: !q('stop').disabled, points: q('curve').querySelectorAll('circle').length,
                samples: [...q('samples').querySelectorAll('figure')].map(f => ({
                    src: f.querySelector('img').src.slice(0, 23), reward: f.querySelector('figcaption').textContent})),
                box: q('dashboard').getBoundingClientRect().toJSON(),
                count: document.querySelectorAll('[data-prdp=dashboard]').length};
    }""")


def screenshot(page, tmp_path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path))
    SCREENS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENS / path.name)
    return path


def picture_of_the_train_node(page, name: str) -> Path:
    """The train node alone (widgets and dashboard), as focus_train_node placed it, into SCREENS:
    docs/images/dashboard.png is one of these, taken mid-training."""
    box = page.evaluate("() => document.querySelector('[data-prdp=dashboard]').getBoundingClientRect().toJSON()")
    top = 30
    clip = {"x": max(0, box["x"] - 24), "y": top, "width": box["width"] + 48,
            "height": box["y"] + box["height"] + 16 - top}
    SCREENS.mkdir(parents=True, exist_ok=True)
    path = SCREENS / f"{name}.png"
    page.screenshot(path=str(path), clip=clip)
    return path


def latest_job(server, name_prefix: str) -> dict:
    jobs = [j for j in harness.get_json(server.base_url, "/prdp/jobs")["jobs"] if j["name"].startswith(name_prefix)]
    assert jobs, "no PRDP job listed"
    return harness.get_json(server.base_url, f"/prdp/jobs/{jobs[-1]['id']}")


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)]


@contextlib.contextmanager
def quick_test_page(server, browser, renderer: str, **train):
    """A fresh page in `renderer` with the quick test loaded (tiny settings, `train` on the
    train node), the train node in view; the page is closed afterwards."""
    context, page = open_page(server, browser, RENDERERS[renderer])
    try:
        load_quick_test(server, page, **train)
        focus_train_node(page)
        require_dom_widgets_in_vue(page, RENDERERS[renderer])
        yield page
    finally:
        context.close()


def wait_for_the_end(server, page, prompt_id: str, message: str, toast: str, tmp_path, screen: str):
    """(result, dashboard): the prompt succeeded, the dashboard's end message contains
    `message` and a toast `toast` was shown; a screenshot named `screen` is taken."""
    result = harness.wait_for(server.base_url, prompt_id, timeout=600)
    assert result.status == "success", result.describe() + "\n" + server.log_tail()
    page.wait_for_function("(t) => document.querySelector('[data-prdp=message]').textContent.includes(t)",
                           arg=message, timeout=30_000)
    wait_for_toast(page, toast)
    shown = dashboard(page)
    screenshot(page, tmp_path, f"{server.comfyui_root.name}-{screen}")
    return result, shown


@pytest.mark.parametrize("renderer", list(RENDERERS))
def test_dashboard_shows_the_epoch_reward_samples_and_the_end(server, browser, tmp_path, renderer):
    lora_name = f"dash_{renderer}"
    with quick_test_page(server, browser, renderer, epochs=1, lora_name=lora_name) as page:
        before = dashboard(page)
        assert before["count"] == 1 and not before["stopEnabled"], before
        assert before["box"]["width"] > 200 and before["box"]["height"] > 150, f"dashboard not laid out: {before}"
        record_dashboard(page)
        record_toasts(page)
        prompt_id = harness.queue_from_page(server.base_url, page)
        _, shown = wait_for_the_end(server, page, prompt_id, "finished",
                                    "PRDP Train LoRA: finished: 1 of 1 epochs; LoRA: prdp/dash_",
                                    tmp_path, f"{renderer}-finished")

        job = latest_job(server, lora_name)
        reward = job["metrics"][0]["reward_mean"]
        assert job["status"] == "finished" and len(job["metrics"]) == 1
        head = shown["metrics"].split("\n")[0]
        assert head.startswith("epoch 1/1  reward "), shown
        assert _numbers(head)[2] == pytest.approx(reward, rel=1e-3, abs=1e-6), (head, reward)
        assert "kl " in shown["metrics"] and "clip " in shown["metrics"]
        agreement = job["metrics"][0]["pair_agreement"]     # the judged number, not the raw loss
        assert f"pairs ranked as the reward ranks them {round(agreement * 100)}%" in shown["metrics"], shown
        assert "loss" not in shown["metrics"] and job["metrics"][0]["loss"] is not None
        assert shown["points"] == 1, shown
        assert shown["samples"] and all(s["src"].startswith("data:image/jpeg;base64") for s in shown["samples"])
        assert all(_numbers(s["reward"]) for s in shown["samples"]), shown["samples"]
        assert "finished: 1 of 1 epochs" in shown["message"] and "prdp/dash_" in shown["message"], shown
        assert not shown["stopEnabled"]
        seen = page.evaluate("() => window.prdpSeen")
        assert any(text.startswith("preparing") and enabled for text, enabled in seen), seen[:10]
        score_texts = page.evaluate("() => [...document.querySelectorAll('[data-prdp=score-text]')].map(e => e.textContent)")
        assert len(score_texts) == 2 and any("minus baseline" in t for t in score_texts), score_texts
        ours = [e for e in page.errors if "prdp" in e.lower()]
        assert not ours, ours


@pytest.mark.parametrize("renderer", list(RENDERERS))
def test_stop_button_ends_the_run_gracefully_and_says_where(server, browser, tmp_path, renderer):
    lora_name = f"dashstop_{renderer}"
    with quick_test_page(server, browser, renderer, epochs=40, lora_name=lora_name) as page:
        loras_before = set(server.loras_dir.rglob("*.safetensors"))
        record_toasts(page)
        prompt_id = harness.queue_from_page(server.base_url, page)
        page.wait_for_function("() => document.querySelectorAll('[data-prdp=curve] circle').length >= 3",
                               timeout=300_000)
        screenshot(page, tmp_path, f"{server.comfyui_root.name}-{renderer}-running")
        picture_of_the_train_node(page, f"dashboard-{server.comfyui_root.name}-{renderer}")   # README's picture
        page.click("[data-prdp=stop]")
        result, shown = wait_for_the_end(server, page, prompt_id, "stopped at epoch", "PRDP Train LoRA: stopped at",
                                         tmp_path, f"{renderer}-stopped")
        job = latest_job(server, lora_name)
        assert job["status"] == "stopped" and 1 <= len(job["metrics"]) < 40, job["status"]
        assert f"stopped at epoch {len(job['metrics'])} of 40" in shown["message"], shown
        written = set(server.loras_dir.rglob("*.safetensors")) - loras_before
        assert any(p.name.startswith(lora_name) for p in written), written
        assert result.outputs, "the prompt's outputs were not kept"


def dashboard_after(page, status_start: str) -> dict:
    """The dashboard (and Score Images' texts) once its status starts with `status_start`."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function("(t) => document.querySelector('[data-prdp=status]')?.textContent.startsWith(t)",
                               arg=status_start, timeout=60_000)
    except PlaywrightTimeout:
        raise AssertionError(f"the dashboard never said {status_start!r}: {dashboard(page)}; "
                             f"page errors {page.errors}") from None
    shown = dashboard(page)
    shown["scores"] = page.evaluate(
        "() => [...document.querySelectorAll('[data-prdp=score-text]')].map(e => e.textContent)")
    return shown


def run_command(page, command: str) -> None:
    page.evaluate("async (c) => { await window.app.extensionManager.command.execute(c); }", command)
    page.wait_for_timeout(1500)


def test_the_finished_run_stays_shown_after_reload_tab_switch_and_a_cached_requeue(server, browser, tmp_path):
    lora_name = "dash_keep"
    with quick_test_page(server, browser, "classic", epochs=1, lora_name=lora_name) as page:
        stacks = []
        page.on("pageerror", lambda error: stacks.append(error.stack or str(error)))
        record_toasts(page)
        prompt_id = harness.queue_from_page(server.base_url, page)
        wait_for_the_end(server, page, prompt_id, "finished", "finished: 1 of 1 epochs", tmp_path, "keep-finished")
        job = latest_job(server, lora_name)
        assert job["info"]["workflow"] == page.evaluate("() => window.app.graph.id"), job["info"]

        def check(shown, where):
            assert shown["points"] == 1 and len(shown["samples"]) == len(job["samples"]) > 0, (where, shown)
            assert shown["metrics"].startswith("epoch 1/1  reward ") and "pairs ranked" in shown["metrics"], shown
            assert f"LoRA: {job['outputs']['lora']}" in shown["message"], (where, shown)
            assert not shown["stopEnabled"]

        page.reload(wait_until="domcontentloaded")
        page.wait_for_function("() => { try { return window.app.graph.nodes.some(n => n.type === 'PRDPTrainLoRA'); }"
                               " catch { return false; } }", timeout=120_000)
        focus_train_node(page)
        shown = dashboard_after(page, "last run: finished")
        screenshot(page, tmp_path, f"{server.comfyui_root.name}-classic-after-reload")
        check(shown, "after a reload")
        assert len(shown["scores"]) == 2 and any("minus baseline" in t for t in shown["scores"]), shown["scores"]

        run_command(page, "Comfy.NewBlankWorkflow")
        assert not page.evaluate("() => window.app.graph.nodes.some(n => n.type === 'PRDPTrainLoRA')")
        run_command(page, "Workspace.PreviousOpenedWorkflow")
        focus_train_node(page)
        shown = dashboard_after(page, "last run: finished")
        screenshot(page, tmp_path, f"{server.comfyui_root.name}-classic-after-tab-switch")
        check(shown, "after a tab switch")
        assert any("minus baseline" in t for t in shown["scores"]), shown["scores"]

        loras_before = set(server.loras_dir.rglob("*.safetensors"))
        prompt_id = harness.queue_from_page(server.base_url, page)
        result = harness.wait_for(server.base_url, prompt_id, timeout=120)
        assert result.status == "success", result.describe()
        cached = [data["nodes"] for kind, data in result.history["status"]["messages"] if kind == "execution_cached"]
        trains = harness.nodes_of_type(result.history["prompt"][2], "PRDPTrainLoRA")
        assert cached and set(trains) <= set(cached[0]), f"ComfyUI ran the train node again: cached {cached}"
        shown = dashboard_after(page, "last run: finished · from ComfyUI's cache")
        screenshot(page, tmp_path, f"{server.comfyui_root.name}-classic-cached")
        check(shown, "after a cached re-queue")
        assert all("from ComfyUI's cache" in t for t in shown["scores"]), shown["scores"]
        assert set(server.loras_dir.rglob("*.safetensors")) == loras_before, "the cached run wrote a LoRA"
        assert latest_job(server, lora_name)["id"] == job["id"], "the cached re-queue started a job"
        ours = [stack for stack in stacks if "prdp" in stack.lower()]
        assert not ours, ours


def test_stop_before_the_first_epoch_ends_says_nothing_was_trained_and_writes_no_lora(server, browser, tmp_path):
    lora_name = "dash_early"
    with quick_test_page(server, browser, "classic", epochs=40, steps=20, lora_name=lora_name) as page:
        loras_before = set(server.loras_dir.rglob("*.safetensors"))
        prompt_id = harness.queue_from_page(server.base_url, page)
        page.wait_for_function("() => !document.querySelector('[data-prdp=stop]').disabled", timeout=120_000)
        page.click("[data-prdp=stop]")
        result = harness.wait_for(server.base_url, prompt_id, timeout=300)
        page.wait_for_function("() => document.querySelector('[data-prdp=message]').textContent.includes('nothing')",
                               timeout=30_000)
        shown = dashboard(page)
        screenshot(page, tmp_path, f"{server.comfyui_root.name}-classic-stopped-early")
        assert "stopped before epoch 1 of 40 finished: nothing was trained; no LoRA written" in shown["message"], shown
        assert result.status != "success", "downstream nodes compared an untrained LoRA"
        assert latest_job(server, lora_name)["status"] == "stopped"
        written = {p for p in set(server.loras_dir.rglob("*.safetensors")) - loras_before if p.name.startswith(lora_name)}
        assert not written, written
