"""The real ComfyUI frontend in headless Chromium (Debian's binary driven by playwright, never
``playwright install``): whether a browser test can run, the page, widgets, Queue."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Mapping

from harness_http import get_json


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
PAGE_TIMEOUT_MS = 120_000


def chromium_path() -> str:
    """Debian's Chromium (env PRDP_CHROMIUM overrides the path), or skip the calling test."""
    path = os.environ.get("PRDP_CHROMIUM", "/usr/bin/chromium")
    if not Path(path).is_file():
        import pytest

        pytest.skip(f"no Chromium at {path} (run scripts/install_chromium.sh or set PRDP_CHROMIUM)")
    return path


def require_browser() -> str:
    """Chromium's path; skips the calling test (before a server starts: call it first) when
    Chromium or the playwright package is missing."""
    import pytest

    path = chromium_path()
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    return path


@contextlib.contextmanager
def headless_chromium():
    """A launched playwright Chromium (Debian's binary, never `playwright install`)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


def open_comfy_page(browser, base_url: str, width: int, height: int):
    """(context, page): the ComfyUI frontend loaded with its node types registered; page
    errors are collected in ``page.errors``. Close the context when done."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(base_url, wait_until="domcontentloaded", timeout=PAGE_TIMEOUT_MS)
    page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && "
                           "window.LiteGraph && Object.keys(LiteGraph.registered_node_types).length > 100",
                           timeout=PAGE_TIMEOUT_MS)
    return context, page


def load_template(page, package: str, name: str) -> None:
    """Load the workflow template `name` of `package` into the page as the template browser
    does: fetched from the template route, then loaded as a new graph."""
    workflow = page.evaluate("async (url) => (await fetch(url)).json()",
                             f"/api/workflow_templates/{package}/{name}.json")
    page.evaluate("async (w) => { await window.app.loadGraphData(w, true, true, null); }", workflow)
    page.wait_for_timeout(500)


def set_page_widgets(page, values_by_type: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Set widget values on every node of each type through the graph API (with the widget's
    callback, as a person's edit runs it); returns the widgets that do not exist."""
    return page.evaluate(
        """(valuesByType) => {
            const problems = [];
            for (const [type, values] of Object.entries(valuesByType))
                for (const node of window.app.graph.nodes.filter(n => n.type === type))
                    for (const [name, value] of Object.entries(values)) {
                        const widget = (node.widgets || []).find(w => w.name === name);
                        if (!widget) { problems.push(`${type}.${name}: no such widget`); continue; }
                        widget.value = value;
                        widget.callback?.(value);
                    }
            window.app.graph.setDirtyCanvas(true, true);
            return problems;
        }""", dict(values_by_type))


def queue_from_page(base_url: str, page, timeout: float = 60) -> str:
    """Press Queue in the page (app.queuePrompt) and return the id of the prompt it queued."""
    known = set(get_json(base_url, "/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = get_json(base_url, "/queue")
        ids = [item[1] for item in queue.get("queue_running", []) + queue.get("queue_pending", [])]
        new = [i for i in ids + list(get_json(base_url, "/history")) if i not in known]
        if new:
            return new[0]
        time.sleep(0.2)
    raise AssertionError(f"the page queued nothing; page errors: {page.errors}")
