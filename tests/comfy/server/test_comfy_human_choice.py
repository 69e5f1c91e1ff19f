"""Teach by choosing (issue 24) in the real ComfyUI frontend, headless Chromium, classic canvas
and Nodes 2.0: the shipped workflow "Teach by choosing - your picks as the reward" with tiny
settings (2 prompts x 2 images, 2 steps, 64 px):

* after epoch 1's sampling the dashboard of PRDP Train LoRA shows the ballot (both prompts'
  images, served by the ballot route), the phase "waiting for your choice (2 of 2 prompts
  left)" and a paused ETA; an image enlarges in an overlay that Esc closes;
* one prompt is answered with keys (digits, Backspace to undo, S and Backspace again, Enter),
  the other with clicks; the answers go out in one POST, the run goes on to its end and the base
  vs finetuned comparison is saved; preferences.jsonl holds exactly what was chosen;
* a page reloaded while the ballot waits shows it again (asked from the route); the stopped run
  resumed from its checkpoint (a run folder of its own) asks the same ballot again;
* Stop while the ballot waits ends the run at once, with a checkpoint and no LoRA (epoch 0),
  and the job and the dashboard say so;
* choices the server refuses (the ballot was answered elsewhere first: 409) are not lost in
  silence: the dashboard says they were not taken and why, asks the route again, and shows the
  next ballot when it comes; the record holds the answer that won.

Screenshots go to /tmp/prdp-screens/ (docs/images/ballot-*.png are two of them).
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest

import comfy_harness as harness
from test_comfy_dashboard import (RENDERERS, SCREENS, focus_train_node, latest_job, open_page, record_toasts,
                                  require_dom_widgets_in_vue, wait_for_toast)

WORKFLOW = "Teach by choosing - your picks as the reward"
TINY = {**harness.TINY_TRAINING, "epochs": 1, "prompts_per_epoch": 2, "images_per_prompt": 2}

pytestmark = pytest.mark.usefixtures("browser_ready", "user_settings_restored")


@pytest.fixture(scope="module")
def browser(server):
    with harness.headless_chromium() as instance:
        yield instance


def load_workflow(page, **train) -> None:
    harness.load_template(page, harness.PACKAGE_LINK_NAME, WORKFLOW)
    problems = harness.set_page_widgets(page, {
        "CheckpointLoaderSimple": {"ckpt_name": harness.TINY_SD15_FILENAME},
        "EmptyLatentImage": {"width": harness.TINY_IMAGE_SIZE, "height": harness.TINY_IMAGE_SIZE},
        "KSampler": {"steps": 2},
        "PRDPTrainLoRA": {**TINY, **train},
    })
    assert not problems, problems


def ballot_shown(page) -> dict:
    return page.evaluate("""() => {
        const q = (k) => document.querySelector(`[data-prdp=${k}]`);
        const panel = q('ballot');
        const figures = [...panel.querySelectorAll('[data-prdp=ballot-image]')];
        return {hidden: panel.hidden, title: q('ballot-title').textContent, prompt: q('ballot-prompt').textContent,
                status: q('status').textContent, error: q('ballot-error').textContent,
                badges: figures.map(f => f.querySelector('[data-prdp=ballot-badge]').textContent),
                images: figures.map(f => { const i = f.querySelector('img');
                    return {src: i.getAttribute('src'), loaded: i.complete && i.naturalWidth > 0,
                            width: i.getBoundingClientRect().width}; }),
                box: panel.getBoundingClientRect().toJSON()};
    }""")


def wait_for_ballot(page, timeout_ms: int = 300_000) -> dict:
    page.wait_for_function("""() => { const p = document.querySelector('[data-prdp=ballot]');
        const images = p ? [...p.querySelectorAll('img')] : [];
        return p && !p.hidden && images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0); }""",
                           timeout=timeout_ms)
    return ballot_shown(page)


def wait_for_another_ballot(page, old_id: str, timeout_ms: int = 300_000) -> dict:
    """The next ballot shown (its image URLs name another ballot id than `old_id`)."""
    page.wait_for_function("""(old) => { const i = document.querySelector('[data-prdp=ballot] img');
        return i && !i.getAttribute('src').includes(old); }""", arg=old_id, timeout=timeout_ms)
    return wait_for_ballot(page)


def rank_image_2_first_by_keys(page, prompts: int) -> None:
    """Answer every prompt of the shown ballot with the keys 2, Enter (answer {"order": [1, 0]})."""
    page.focus("[data-prdp=ballot]")
    for _ in range(prompts):
        page.keyboard.press("2")
        page.keyboard.press("Enter")


def preference_record(server, job: dict) -> list:
    return [json.loads(line) for line in (run_folder(server, job) / "preferences.jsonl").read_text().splitlines()]


def focus_dashboard(page) -> None:
    """Move the canvas so the train node's dashboard (with its ballot) is in view, 40 px from the
    top (the node grew to show the ballot; both renderers use the canvas transform)."""
    page.evaluate("""() => {
        const box = document.querySelector('[data-prdp=dashboard]').getBoundingClientRect();
        const ds = window.app.canvas.ds;
        ds.offset[1] -= (box.y - 40) / ds.scale;
        window.app.canvas.setDirty(true, true);
    }""")
    page.wait_for_timeout(600)


def picture_of_the_ballot(page, name: str) -> Path:
    """The train node's dashboard with its ballot, for a person (and the README) to look at."""
    box = page.evaluate("() => document.querySelector('[data-prdp=dashboard]').getBoundingClientRect().toJSON()")
    clip = {"x": max(0, box["x"] - 12), "y": max(0, box["y"] - 12), "width": box["width"] + 24,
            "height": box["height"] + 24}
    SCREENS.mkdir(parents=True, exist_ok=True)
    path = SCREENS / f"{name}.png"
    page.screenshot(path=str(path), clip=clip)
    return path


def stop_unfinished(server, lora_name: str) -> None:
    """A failed test leaves no run waiting for a ballot (it would hold the server's queue)."""
    for job in harness.get_json(server.base_url, "/prdp/jobs")["jobs"]:
        if job["name"].startswith(lora_name) and job["status"] in ("preparing", "pending", "running"):
            harness.http_json("POST", f"{server.base_url}/prdp/jobs/{job['id']}/stop")


@contextlib.contextmanager
def page_for_run(server, browser, vue: bool, lora_name: str):
    """A fresh page (Nodes 2.0 or classic); afterwards closed, and no run of `lora_name` left
    waiting for a ballot."""
    context, page = open_page(server, browser, vue)
    try:
        yield page
    finally:
        context.close()
        stop_unfinished(server, lora_name)


def run_folder(server, job: dict) -> Path:
    return server.output_dir / "prdp_runs" / job["outputs"]["run_dir"]


@pytest.mark.parametrize("renderer", list(RENDERERS))
def test_choosing_in_the_dashboard_trains_to_the_end(server, browser, renderer):
    started = time.monotonic()
    tree = server.comfyui_root.name
    lora_name = f"human_{renderer}"
    with page_for_run(server, browser, RENDERERS[renderer], lora_name) as page:
        load_workflow(page, lora_name=lora_name)
        focus_train_node(page)
        require_dom_widgets_in_vue(page, RENDERERS[renderer])
        record_toasts(page)
        prompt_id = harness.queue_from_page(server.base_url, page)
        shown = wait_for_ballot(page)
        job = latest_job(server, lora_name)
        ballot = harness.get_json(server.base_url, f"/prdp/jobs/{job['id']}/ballot")
        # the route's URLs, under the frontend's API prefix
        assert [i["src"].removeprefix("/api") for i in shown["images"]] == ballot["images"][0], (shown, ballot)
        assert shown["title"].startswith("waiting for your choice (2 of 2 prompts left) · prompt 1 of 2"), shown
        assert ballot["prompts"][0] in shown["prompt"], shown
        assert "waiting for your choice (2 of 2 prompts left)" in shown["status"] and "ETA paused" in shown["status"]
        assert all(image["width"] >= 120 for image in shown["images"]), f"images too small to judge: {shown}"
        assert "waiting for your choice (2 of 2 prompts left)" in job["phase"], job["phase"]
        focus_dashboard(page)           # the node grew: its dashboard in view
        picture_of_the_ballot(page, f"ballot-{tree}-{renderer}")

        page.click("[data-prdp=ballot-image][data-index='1'] [data-prdp=ballot-zoom]")
        page.wait_for_selector("[data-prdp=overlay]")
        page.keyboard.press("Escape")
        page.wait_for_selector("[data-prdp=overlay]", state="detached")

        # prompt 1 by keys: rank image 2, undo it, skip the prompt, undo the skip, rank image 2, Enter
        page.focus("[data-prdp=ballot]")
        page.keyboard.press("2")
        assert ballot_shown(page)["badges"] == ["1", "#1"]
        page.keyboard.press("Backspace")
        assert ballot_shown(page)["badges"] == ["1", "2"]
        page.keyboard.press("s")
        assert "prompt 2 of 2" in ballot_shown(page)["title"]
        page.keyboard.press("Backspace")
        page.keyboard.press("2")
        page.keyboard.press("Enter")
        after_keys = ballot_shown(page)
        assert after_keys["title"].startswith("waiting for your choice (1 of 2 prompts left) · prompt 2 of 2"), after_keys
        # prompt 2 by clicks: image 1 is the best (of two: image 2 the worst), then Done
        page.click("[data-prdp=ballot-image][data-index='0']")
        page.click("[data-prdp=ballot-done]")
        page.wait_for_function("() => document.querySelector('[data-prdp=ballot]').hidden", timeout=30_000)

        result = harness.wait_for(server.base_url, prompt_id, timeout=600)
        assert result.status == "success", result.describe() + "\n" + server.log_tail()
        page.wait_for_function("() => document.querySelector('[data-prdp=message]').textContent.includes('finished')",
                               timeout=30_000)
        wait_for_toast(page, "PRDP Train LoRA: finished: 1 of 1 epochs; LoRA: prdp/human_")
        job = latest_job(server, lora_name)
        assert job["status"] == "finished" and len(job["metrics"]) == 1, job["status"]
        record = preference_record(server, job)
        assert [(r["epoch"], r["prompt_index"], r["answer"], r["ranks"]) for r in record] == [
            (1, 0, {"order": [1, 0]}, [2, 1]), (1, 1, {"order": [0, 1]}, [1, 2])], record
        assert [r["prompt"] for r in record] == ballot["prompts"]
        saved = [n for n in harness.nodes_of_type(result.history["prompt"][2], "SaveImage")]
        assert saved and all((result.outputs.get(n) or {}).get("images") for n in saved), result.outputs
        ours = [e for e in page.errors if "prdp" in e.lower()]
        assert not ours, ours
    print(f"{tree} {renderer}: choosing test {time.monotonic() - started:.1f} s")


@pytest.mark.parametrize("how", ["stop", "cancel"])
def test_stop_while_the_ballot_waits_ends_at_once_with_a_checkpoint(server, browser, how):
    """Stop: the dashboard's button. Cancel: ComfyUI's own (POST /interrupt, as its queue's
    Cancel sends), which the node turns into the same stop."""
    started = time.monotonic()
    lora_name = f"human_{how}"
    loras_before = set(server.loras_dir.rglob("*.safetensors"))
    with page_for_run(server, browser, False, lora_name) as page:
        load_workflow(page, lora_name=lora_name, epochs=2)
        focus_train_node(page)
        prompt_id = harness.queue_from_page(server.base_url, page)
        before_reload = wait_for_ballot(page)
        asked = harness.get_json(server.base_url, f"/prdp/jobs/{latest_job(server, lora_name)['id']}/ballot")
        # a reloaded page asks the route for the waiting ballot again
        page.reload(wait_until="domcontentloaded")
        page.wait_for_function("() => { try { return window.app.graph.nodes.some(n => n.type === 'PRDPTrainLoRA'); }"
                               " catch { return false; } }", timeout=120_000)
        focus_train_node(page)
        after_reload = wait_for_ballot(page, timeout_ms=60_000)
        assert [i["src"] for i in after_reload["images"]] == [i["src"] for i in before_reload["images"]], after_reload
        assert after_reload["title"].startswith("waiting for your choice (2 of 2 prompts left)"), after_reload
        focus_dashboard(page)
        clicked = time.monotonic()
        if how == "stop":
            page.click("[data-prdp=stop]")
        else:
            harness.http_json("POST", f"{server.base_url}/interrupt", {})
        result = harness.wait_for(server.base_url, prompt_id, timeout=120)
        stopped_in = time.monotonic() - clicked
        page.wait_for_function("() => document.querySelector('[data-prdp=message]').textContent.includes('nothing')",
                               timeout=30_000)
        message = page.evaluate("() => document.querySelector('[data-prdp=message]').textContent")
        assert "stopped before epoch 1 of 2 finished: nothing was trained; no LoRA written" in message, message
        assert page.evaluate("() => document.querySelector('[data-prdp=ballot]').hidden")
        assert result.status != "success", "downstream nodes compared an untrained LoRA"
        assert stopped_in < 20, f"Stop while waiting took {stopped_in:.1f} s"
        job = latest_job(server, lora_name)
        assert job["status"] == "stopped" and job["metrics"] == [], job["status"]
        assert job["outputs"]["message"].startswith("stopped before epoch 1 of 2 finished"), job["outputs"]
        # the trainer names it relative to ComfyUI's base folder (output/prdp_runs/...)
        assert job["checkpoints"] and all((server.base_dir / p).exists() for p in job["checkpoints"]), job["checkpoints"]
        written = {p for p in set(server.loras_dir.rglob("*.safetensors")) - loras_before if p.name.startswith(lora_name)}
        assert not written, written
        if how == "stop":
            resume_and_answer(server, page, lora_name, job, asked)
    print(f"{server.comfyui_root.name}: {how} test {time.monotonic() - started:.1f} s (stopped {stopped_in:.1f} s after the click)")


def resume_and_answer(server, page, lora_name: str, stopped: dict, asked: dict) -> None:
    """Resume the stopped run from its checkpoint (a new run folder, as every queued run): the
    unanswered ballot is asked again, the answers train both epochs, and the new folder's record
    holds them."""
    checkpoint = Path(stopped["checkpoints"][-1])          # output/prdp_runs/<run>/checkpoints/<name>
    problems = harness.set_page_widgets(page, {"PRDPTrainLoRA": {"resume_from": "/".join(checkpoint.parts[-3:])}})
    assert not problems, problems
    prompt_id = harness.queue_from_page(server.base_url, page)
    wait_for_ballot(page)
    job = latest_job(server, lora_name)
    assert job["id"] != stopped["id"]
    again = harness.get_json(server.base_url, f"/prdp/jobs/{job['id']}/ballot")
    assert (again["id"], again["epoch"], again["prompts"]) == (asked["id"], 1, asked["prompts"]), again
    rank_image_2_first_by_keys(page, len(asked["prompts"]))
    wait_for_another_ballot(page, asked["id"])
    rank_image_2_first_by_keys(page, len(asked["prompts"]))
    result = harness.wait_for(server.base_url, prompt_id, timeout=600)
    assert result.status == "success", result.describe() + "\n" + server.log_tail()
    job = latest_job(server, lora_name)
    assert job["status"] == "finished" and job["outputs"]["run_dir"] != stopped["outputs"]["run_dir"], job["outputs"]
    record = preference_record(server, job)
    assert [(r["epoch"], r["ballot"] if r["epoch"] == 1 else None, r["answer"]) for r in record] == [
        (1, asked["id"], {"order": [1, 0]}), (1, asked["id"], {"order": [1, 0]}),
        (2, None, {"order": [1, 0]}), (2, None, {"order": [1, 0]})], record


def test_choices_refused_by_the_server_are_shown_and_the_ballot_is_asked_again(server, browser):
    """The ballot is answered elsewhere (another tab, a script) just before the dashboard's POST
    reaches the server: the server refuses it with 409, the dashboard says so and asks the route
    again (the next epoch's ballot then shows and is answered), and the record holds the answer
    that won."""
    started = time.monotonic()
    lora_name = "human_refused"
    elsewhere = {"answers": [{"order": [0, 1]}, {"order": [0, 1]}]}
    posts, refetched = [], []
    with page_for_run(server, browser, False, lora_name) as page:
        load_workflow(page, lora_name=lora_name, epochs=2)
        focus_train_node(page)
        prompt_id = harness.queue_from_page(server.base_url, page)
        first = wait_for_ballot(page)
        job = latest_job(server, lora_name)
        ballot = harness.get_json(server.base_url, f"/prdp/jobs/{job['id']}/ballot")
        page.evaluate("""() => { window.prdpMessages = [];
            const message = document.querySelector('[data-prdp=message]');
            new MutationObserver(() => window.prdpMessages.push(message.textContent))
                .observe(message, {childList: true, characterData: true, subtree: true}); }""")

        def answer_elsewhere_first(route):
            if route.request.method == "POST" and not posts:
                posts.append(harness.http_json("POST", server.base_url + ballot["answer_url"], elsewhere))
            route.continue_()
        page.route("**/prdp/jobs/*/ballot/*", answer_elsewhere_first)
        page.on("request", lambda request: posts and request.method == "GET" and request.url.endswith(
            f"/prdp/jobs/{job['id']}/ballot") and refetched.append(request.url))

        rank_image_2_first_by_keys(page, len(ballot["prompts"]))     # the dashboard's own answer
        page.wait_for_function("() => window.prdpMessages.some(m => m.includes('not taken'))", timeout=30_000)
        shown = [m for m in page.evaluate("() => window.prdpMessages") if "not taken" in m]
        assert "your choices were not taken: this ballot was answered already (HTTP 409)" in shown[0], shown
        assert [(p["ballot"], p["epoch"]) for p in posts] == [(ballot["id"], 1)], posts

        second = wait_for_another_ballot(page, ballot["id"])     # asked again: the next epoch's ballot
        assert refetched, "the dashboard did not ask the route for the ballot after the refusal"
        assert second["title"].startswith("waiting for your choice (2 of 2 prompts left)"), second
        assert [i["src"] for i in second["images"]] != [i["src"] for i in first["images"]]
        message = page.evaluate("() => document.querySelector('[data-prdp=message]').textContent")
        assert "not taken" in message, f"the refusal went with the ballot it refused: {message!r}"
        picture_of_the_ballot(page, f"ballot-refused-{server.comfyui_root.name}")
        rank_image_2_first_by_keys(page, len(ballot["prompts"]))
        result = harness.wait_for(server.base_url, prompt_id, timeout=600)
        assert result.status == "success", result.describe() + "\n" + server.log_tail()
        record = preference_record(server, latest_job(server, lora_name))
        assert [(r["epoch"], r["answer"]) for r in record] == [
            (1, {"order": [0, 1]}), (1, {"order": [0, 1]}), (2, {"order": [1, 0]}), (2, {"order": [1, 0]})], record
        ours = [e for e in page.errors if "prdp" in e.lower()]
        assert not ours, ours
    print(f"{server.comfyui_root.name}: refused-answer test {time.monotonic() - started:.1f} s")
