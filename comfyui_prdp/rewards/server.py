"""`python -m comfyui_prdp serve-reward --reward NAME`: a reward model in its own process.

An aiohttp server, bound to 127.0.0.1 unless --host says otherwise, that scores images sent by
a trainer (`--reward http://127.0.0.1:PORT`, rewards/remote.py). The JSON protocol is in
docs/reward-protocol.md. Every request is checked before it is scored (sizes, shapes, finite
values in 0..1, prompts); a bad one gets a 4xx answer with {"error": "..."} and the server keeps
serving. Nothing is unpickled: images travel as raw little-endian float32 (or PNG) in base64.
One request is scored at a time (a lock): a reward model is not assumed to be thread-safe.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import signal
import threading
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

PROTOCOL = 1
DEFAULT_PORT = 8190
DEFAULT_MAX_BODY_MB = 64
DEFAULT_MAX_IMAGES = 64
MAX_SIDE = 4096
FLOAT32_PIXEL_BYTES = 12   # one RGB pixel in float32: the unit of the decoded-pixel budget
MAX_PROMPT_CHARS = 2000
ENCODINGS = ("float32", "png")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class BadRequest(ValueError):
    """A request the server refuses; `status` is its HTTP status (4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- requests
def pixel_budget(max_body_bytes: int) -> int:
    """The most pixels one request may decode to: as many as a float32 image of `max_body_bytes`
    holds. A PNG compresses far better than that (a black 4096x4096 one is ~50 kB), so without
    this bound a body within its limit could decode to gigabytes."""
    return max(1, max_body_bytes // FLOAT32_PIXEL_BYTES)


def decode_request(body: Any, max_images: int,
                   max_pixels: int = pixel_budget(DEFAULT_MAX_BODY_MB * 2 ** 20)) -> Tuple[torch.Tensor, List[str]]:
    """(images [B, H, W, 3] float32 in 0..1, prompts [B]) of a parsed /score body; BadRequest
    naming the first problem otherwise (413 for more than `max_pixels` decoded pixels)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with 'images' and 'prompts'")
    images = body.get("images")
    if not isinstance(images, dict):
        raise BadRequest("'images' must be an object: {\"encoding\": \"float32\", \"shape\": [B, H, W, 3], "
                         "\"data\": base64}")
    encoding = images.get("encoding", "float32")
    if encoding == "float32":
        array = _decode_float32(images, max_images)
    elif encoding == "png":
        array = _decode_png(images, max_images, max_pixels)
    else:
        raise BadRequest(f"images.encoding {encoding!r} is not supported; use one of {', '.join(ENCODINGS)}")
    if not np.isfinite(array).all():
        raise BadRequest("the images hold NaN or inf values; send finite values in 0..1")
    if array.min() < 0.0 or array.max() > 1.0:
        raise BadRequest(f"image values span {array.min():.4g}..{array.max():.4g}; send values in 0..1")
    prompts = body.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("'prompts' must be a list of strings, one per image")
    if len(prompts) != len(array):
        raise BadRequest(f"{len(prompts)} prompts for {len(array)} images; send one prompt per image")
    long = next((i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS), None)
    if long is not None:
        raise BadRequest(f"prompt {long} is {len(prompts[long])} characters long (at most {MAX_PROMPT_CHARS})")
    return torch.from_numpy(np.ascontiguousarray(array)), prompts


def _base64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise BadRequest(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64") from None


def _decode_float32(images: dict, max_images: int) -> np.ndarray:
    shape = images.get("shape")
    if (not isinstance(shape, list) or len(shape) != 4
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape)):
        raise BadRequest("images.shape must be four whole numbers [B, H, W, 3]")
    count, height, width, channels = shape
    if channels != 3:
        raise BadRequest(f"images.shape {shape}: the last dimension must be 3 (RGB)")
    if not 1 <= count <= max_images:
        raise BadRequest(f"images.shape {shape}: send 1 to {max_images} images per request")
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise BadRequest(f"images.shape {shape}: height and width must be 1 to {MAX_SIDE}")
    data = _base64(images.get("data"), "images.data")
    expected = count * height * width * 3 * 4
    if len(data) != expected:
        raise BadRequest(f"images.data has {len(data)} bytes; shape {shape} in float32 needs {expected}")
    return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)


def _decode_png(images: dict, max_images: int, max_pixels: int) -> np.ndarray:
    """Each PNG's size is read from its header (PIL decodes lazily) and checked, alone and with
    the images before it, against `max_pixels` before any pixel is decoded."""
    from PIL import Image

    items = images.get("data")
    if not isinstance(items, list) or not 1 <= len(items) <= max_images:
        raise BadRequest(f"images.data must be a list of 1 to {max_images} base64 PNG images")
    arrays, pixels = [], 0
    for index, item in enumerate(items):
        raw = _base64(item, f"images.data[{index}]")
        try:
            with Image.open(io.BytesIO(raw)) as image:
                if image.format != "PNG":
                    raise BadRequest(f"images.data[{index}] is {image.format}, not PNG")
                if max(image.size) > MAX_SIDE:
                    raise BadRequest(f"images.data[{index}] is {image.size[0]}x{image.size[1]}; at most {MAX_SIDE}")
                width, height = image.size
                raise_it = "the body limit / 12; serve-reward --max-body-mb raises it"
                if width * height > max_pixels:
                    raise BadRequest(f"images.data[{index}] is {width}x{height} = {width * height} pixels, more than "
                                     f"this server's budget of {max_pixels} per request ({raise_it}); send smaller "
                                     "images", 413)
                pixels += width * height
                if pixels > max_pixels:
                    raise BadRequest(f"images.data[0..{index}] decode to {pixels} pixels, more than this server's "
                                     f"budget of {max_pixels} per request ({raise_it}); send fewer or smaller "
                                     "images per request", 413)
                arrays.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
        except BadRequest:
            raise
        except Exception:  # noqa: BLE001  (any decoder failure is the client's data)
            raise BadRequest(f"images.data[{index}] is not a readable PNG image") from None
    if len({a.shape for a in arrays}) != 1:
        raise BadRequest("the PNG images have different sizes; send images of one size per request")
    return np.stack(arrays)


# ----------------------------------------------------------------------------- scoring
class Scorer:
    """The reward behind a lock; the scores checked before they are sent."""

    def __init__(self, reward):
        self.reward = reward
        self.name = getattr(reward, "name", type(reward).__name__)
        self._lock = threading.Lock()

    def __call__(self, images: torch.Tensor, prompts: List[str]) -> Dict[str, Any]:
        with self._lock:
            self.reward.prepare()
            try:
                with torch.no_grad():
                    total, components = self.reward.score_with_components(images, prompts)
            finally:
                self.reward.offload()
        scores = [float(v) for v in total.detach().float().cpu().reshape(-1).tolist()]
        if len(scores) != len(images) or any(len(v) != len(images) for v in components.values()):
            raise RuntimeError(f"reward {self.name!r} returned {len(scores)} scores for {len(images)} images")
        parts = {name: [float(v) for v in values.detach().float().cpu().tolist()]
                 for name, values in components.items()}
        if not all(math.isfinite(v) for values in [scores, *parts.values()] for v in values):
            raise RuntimeError(f"reward {self.name!r} returned non-finite scores")
        return {"scores": scores, "components": parts}


def build_app(reward, max_body_bytes: int = DEFAULT_MAX_BODY_MB * 2 ** 20, max_images: int = DEFAULT_MAX_IMAGES):
    """The aiohttp application: GET /info, POST /score."""
    from aiohttp import web

    scorer = Scorer(reward)
    max_pixels = pixel_budget(max_body_bytes)
    info = {"protocol": PROTOCOL, "reward": scorer.name, "max_body_bytes": max_body_bytes,
            "max_images": max_images, "max_pixels": max_pixels, "encodings": list(ENCODINGS)}

    def error(status: int, message: str):
        return web.json_response({"error": message}, status=status)

    async def get_info(request):
        return web.json_response(info)

    async def post_score(request):
        if request.content_length is not None and request.content_length > max_body_bytes:
            return error(413, f"the body is {request.content_length} bytes, more than this server's "
                              f"{max_body_bytes}; send fewer images per request")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error(413, f"the body is larger than this server's {max_body_bytes} bytes; send fewer "
                              "images per request")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as problem:
            return error(400, f"the body is not JSON ({problem}); see docs/reward-protocol.md")
        except RecursionError:
            return error(400, "the body's JSON is nested too deeply to parse; see docs/reward-protocol.md")
        try:
            images, prompts = decode_request(body, max_images, max_pixels)
        except BadRequest as problem:
            return error(problem.status, str(problem))
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, scorer, images, prompts)
        except Exception as problem:  # noqa: BLE001  (the reward failed: answer, keep serving)
            first = str(problem).splitlines()[0] if str(problem) else ""
            return error(500, f"reward {scorer.name!r} failed: {type(problem).__name__}: {first[:500]}")
        return web.json_response(result)

    app = web.Application(client_max_size=max_body_bytes)
    app.router.add_get("/info", get_info)
    app.router.add_post("/score", post_score)
    return app


class RewardServer:
    """The server on (host, port); port 0 picks a free one. `start()` runs it in a background
    thread (tests, embedding) and returns its URL; `serve_forever()` runs it in this thread."""

    def __init__(self, reward, host: str = "127.0.0.1", port: int = DEFAULT_PORT, **limits):
        self.app = build_app(reward, **limits)
        self.reward_name = getattr(reward, "name", type(reward).__name__)
        self.host, self.port = host, port
        self.url: Optional[str] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._stopped: Optional[asyncio.Event] = None

    async def _serve(self, ready: threading.Event) -> None:
        from aiohttp import web

        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            port = runner.addresses[0][1]
            host = f"[{self.host}]" if ":" in self.host else self.host
            self.url = f"http://{host}:{port}"
            self._stopped = asyncio.Event()
            ready.set()
            await self._stopped.wait()
        finally:
            ready.set()
            await runner.cleanup()

    def start(self) -> str:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(ready),),
                                        name="prdp-reward-server", daemon=True)
        self._thread.start()
        ready.wait(30)
        if self.url is None:
            raise RuntimeError(f"the reward server did not start on {self.host}:{self.port}")
        return self.url

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(30)
        if self._loop is not None and not self._loop.is_running():
            self._loop.close()

    def serve_forever(self, announce=print) -> None:
        ready = threading.Event()

        async def main():
            task = asyncio.ensure_future(self._serve(ready))
            while not ready.is_set():
                await asyncio.sleep(0.01)
            if self.url is not None:
                try:                              # SIGTERM (a job scheduler) ends it like Ctrl-C
                    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._stopped.set)
                except (NotImplementedError, RuntimeError):   # not on Windows
                    pass
                announce(f"serving reward {self.reward_name!r} on {self.url} (protocol {PROTOCOL}); "
                         "Ctrl-C stops")
            await task

        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            pass
