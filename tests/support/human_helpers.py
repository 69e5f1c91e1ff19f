"""Shared by the human reward's tests: the /prdp/ routes on a real aiohttp server on a free port
(in a thread), a tiny HTTP client, and a scripted chooser that answers ballots through the routes."""
from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, List, Optional

import numpy as np
import torch
from PIL import Image

from comfyui_prdp.rewards.base import Reward

from comfyui_prdp.service.routes import add_routes


class Server:
    def __init__(self, registry):
        from aiohttp import web
        self.loop = asyncio.new_event_loop()
        routes = web.RouteTableDef()
        add_routes(routes, registry)
        app = web.Application()
        app.add_routes(routes)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self):
        async def stop():
            await self.runner.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def request(url: str, body: Optional[bytes] = None, method: Optional[str] = None):
    """(status, parsed JSON or raw bytes)."""
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"),
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            status, data, kind = response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        status, data, kind = error.code, error.read(), error.headers.get("Content-Type", "")
    return status, (json.loads(data) if "json" in kind else data)


def post_json(url: str, value) -> tuple:
    return request(url, json.dumps(value).encode())


def quantised(images: torch.Tensor) -> torch.Tensor:
    """What a PNG of the images holds (8 bits per channel), as 0..255 values."""
    return (images.float().clamp(0, 1) * 255).round()


def darkest_best(means: List[float]) -> dict:
    """The fixed rule: the darkest image is the best, the brightest the worst (first on ties)."""
    best = min(range(len(means)), key=lambda i: (means[i], i))
    worst = max(range(len(means)), key=lambda i: (means[i], -i))
    return {"best": best, "worst": worst}


class RuleReward(Reward):
    """The rule as a reward function: per prompt group of B, best 1, worst -1, others 0."""
    name = "darkest-best"

    def __init__(self, images_per_prompt: int):
        self.B = images_per_prompt

    def score(self, images, prompts):
        means = quantised(images).double().mean(dim=(1, 2, 3))
        out = torch.zeros(len(images))
        for k in range(0, len(images), self.B):
            choice = darkest_best(means[k:k + self.B].tolist())
            out[k + choice["best"]], out[k + choice["worst"]] = 1.0, -1.0
        return out



def png_mean(data: bytes) -> float:
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    return float(torch.from_numpy(pixels).mean())


def darkest_first_pngs(pngs: List[bytes]) -> dict:
    """darkest_best over the ballot's PNG images (what a person sees)."""
    return darkest_best([png_mean(png) for png in pngs])


def answer_by_rule(base: str, job_id: str, ballot: dict,
                   rule: Callable[[List[bytes]], dict] = darkest_first_pngs) -> tuple:
    """Fetch the ballot's images through the routes and answer each prompt by `rule` (the PNGs
    of its images -> an answer)."""
    answers = []
    for urls in ballot["images"]:
        pngs = []
        for url in urls:
            status, data = request(base + url)
            assert status == 200, (status, data)
            pngs.append(data)
        answers.append(rule(pngs))
    return post_json(base + ballot["answer_url"], {"answers": answers})


def wait_for_ballot(base: str, job, timeout: float = 120.0, not_id: Optional[str] = None) -> Optional[dict]:
    """The job's open ballot (another than `not_id`), or None once the job ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = request(f"{base}/prdp/jobs/{job.id}/ballot")
        if status == 200 and body["id"] != not_id:
            return body
        if job.done:
            return None
        time.sleep(0.02)
    raise AssertionError("no ballot appeared")


def chooser(base: str, job, ballots: Optional[int] = None,
            on_ballot: Optional[Callable[[dict], None]] = None,
            rule: Callable[[List[bytes]], dict] = darkest_first_pngs) -> List[dict]:
    """Answer the job's ballots by `rule` until it ends (or `ballots` were answered)."""
    seen, last = [], None
    while ballots is None or len(seen) < ballots:
        ballot = wait_for_ballot(base, job, not_id=last)
        if ballot is None:
            break
        if on_ballot is not None:
            on_ballot(ballot)
        status, body = answer_by_rule(base, job.id, ballot, rule)
        assert status == 200, (status, body)
        seen.append(ballot)
        last = ballot["id"]
    return seen
