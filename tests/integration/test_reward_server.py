"""Reward models in their own process: `serve-reward` and a reward named by URL, end to end on
the loopback: exact scores, batching, bad requests answered 4xx without harming the server, a
failing reward 500, retries and timeouts, a clear error when the server is down, training
through it, the command line and the Load Reward Model node."""
import base64
import http.server
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_prdp import cli
from comfyui_prdp.models import loading as model_loading
from comfyui_prdp.lora.files import load_lora
from comfyui_prdp.rewards.server import RewardServer
from comfyui_prdp.rewards import create_reward
from comfyui_prdp.rewards.remote import RemoteReward, RewardServerError
from comfyui_prdp.trainer import Trainer
from comfy_inprocess import REPO_ROOT, load_plugin_package
from test_trainer import PROMPTS, toy_config
from toy_backend import BrightnessReward, ToyBackend


@pytest.fixture
def serve():
    """serve(reward, **limits) -> URL of a server on a free loopback port (stopped afterwards)."""
    servers = []

    def start(reward, **limits):
        server = RewardServer(reward, "127.0.0.1", 0, **limits)
        servers.append(server)
        return server.start()
    yield start
    for server in servers:
        server.stop()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url, body: bytes, path="/score", method="POST"):
    """(status, parsed JSON answer) of a raw request."""
    request = urllib.request.Request(url + path, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        return error.code, (json.loads(text) if text.startswith(b"{") else text.decode())


def float32_body(images, prompts, shape=None, data=None, **extra):
    images = images.float().contiguous()
    raw = images.numpy().astype("<f4").tobytes()
    body = {"prompts": prompts, "images": {"encoding": "float32", "shape": shape or list(images.shape),
                                           "data": data if data is not None else base64.b64encode(raw).decode()}}
    body["images"].update(extra)
    return json.dumps(body).encode()


class CountingReward(BrightnessReward):
    """Brightness, counting calls; optionally slow or failing."""

    def __init__(self, delay=0.0, fail=False):
        super().__init__()
        self.calls, self.delay, self.fail = 0, delay, fail

    def score_with_components(self, images, prompts):
        self.calls += 1
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("the judge model ran out of memory")
        value = self.score(images, prompts)
        return value, {"brightness": value, "twice": 2 * value}


def test_remote_scores_equal_local_scores_in_batches(serve):
    local = create_reward("jpeg-compressibility")
    url = serve(local, max_images=3)
    remote = create_reward(url)
    assert isinstance(remote, RemoteReward) and remote.name == "jpeg-compressibility" and remote.max_images == 3
    images = torch.rand(7, 24, 40, 3)
    images[2] = 0.5
    prompts = [f"p{i}" for i in range(7)]
    assert torch.equal(remote.score(images, prompts), local.score(images, prompts))   # float32 travels exactly
    counting = CountingReward()
    url = serve(counting, max_images=2)
    total, parts = create_reward(url).score_with_components(images, prompts)
    expected = images.mean(dim=(1, 2, 3))
    assert torch.equal(total, expected) and torch.equal(parts["twice"], 2 * expected)
    assert counting.calls == 4                       # 7 images, 2 per request


def test_batches_fit_the_servers_body_limit(serve):
    counting = CountingReward()
    url = serve(counting, max_images=64, max_body_bytes=200_000)     # one 64x64 float32 image is ~65 kB of base64
    scores = create_reward(url).score(torch.rand(5, 64, 64, 3), ["x"] * 5)
    assert scores.shape == (5,) and counting.calls >= 3


def test_png_images_are_accepted(serve):
    url = serve(CountingReward())
    pixels = (np.random.default_rng(0).random((2, 8, 8, 3)) * 255).astype(np.uint8)
    encoded = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    body = json.dumps({"prompts": ["a", "b"], "images": {"encoding": "png", "data": encoded}}).encode()
    status, answer = post(url, body)
    assert status == 200, answer
    assert answer["scores"] == pytest.approx((pixels / 255.0).mean(axis=(1, 2, 3)).tolist(), abs=1e-6)


def png_base64(width, height, truncate=False):
    """A black PNG of width x height in base64; `truncate` keeps only its header (no pixel data)."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    data = buffer.getvalue()
    return base64.b64encode(data[:data.index(b"IDAT") + 4] if truncate else data).decode()


def png_body(*sizes):
    """A /score body of PNGs; each size is (width, height) or (width, height, truncate)."""
    encoded = [png_base64(*size) for size in sizes]
    return json.dumps({"prompts": ["p"] * len(sizes), "images": {"encoding": "png", "data": encoded}}).encode()


def bad_requests():
    good = torch.rand(2, 4, 4, 3)
    nan = good.clone()
    nan[1, 0, 0, 0] = float("nan")
    return [
        ("not JSON", b"{'images': ", 400, "not JSON"),
        ("not UTF-8", b"\xff\xfe{}", 400, "not JSON"),
        ("a list", b"[1, 2]", 400, "JSON object"),
        ("no images", json.dumps({"prompts": []}).encode(), 400, "'images' must be an object"),
        ("4 channels", float32_body(torch.rand(2, 4, 4, 4), ["a", "b"]), 400, "last dimension must be 3"),
        ("shape vs data", float32_body(good, ["a", "b"], shape=[2, 4, 5, 3]), 400, "needs 480"),
        ("huge side", float32_body(good, ["a", "b"], shape=[1, 5000, 4, 3]), 400, "height and width"),
        ("too many", float32_body(torch.rand(9, 2, 2, 3), ["a"] * 9), 400, "1 to 8 images"),
        ("bad shape type", float32_body(good, ["a", "b"], shape=[2, 4, 4.0, 3]), 400, "four whole numbers"),
        ("nan", float32_body(nan, ["a", "b"]), 400, "NaN or inf"),
        ("range", float32_body(good * 3, ["a", "b"]), 400, "values in 0..1"),
        ("prompt count", float32_body(good, ["a"]), 400, "1 prompts for 2 images"),
        ("prompt type", float32_body(good, ["a", 3]), 400, "list of strings"),
        ("long prompt", float32_body(good, ["a", "x" * 3000]), 400, "3000 characters"),
        ("base64", float32_body(good, ["a", "b"], data="!!!"), 400, "not valid base64"),
        ("encoding", float32_body(good, ["a", "b"], encoding="pickle"), 400, "'pickle' is not supported"),
        ("png garbage", json.dumps({"prompts": ["a"], "images": {"encoding": "png",
                                    "data": [base64.b64encode(b"GIF89a....").decode()]}}).encode(),
         400, "not a readable PNG"),
        ("oversized", b"{" + b" " * 300_000 + b"}", 413, "more than this server's 200000"),
        ("deep JSON", b"[" * 50_000 + b"]" * 50_000, 400, "nested too deeply"),
        # the 200000-byte body limit gives a budget of 200000 // 12 = 16666 decoded pixels per request
        ("PNG over the pixel budget", png_body((200, 100)), 413, "20000 pixels, more than this server's budget "
                                                                  "of 16666 per request (the body limit / 12"),
        ("PNGs over the pixel budget together", png_body((100, 100), (100, 100)), 413,
         "images.data[0..1] decode to 20000 pixels"),
        ("PNG header over the budget", png_body((100, 100), (4096, 4096, True)), 413,
         "images.data[1] is 4096x4096"),       # refused from its header, before any pixel is decoded
    ]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(serve):
    counting = CountingReward()
    url = serve(counting, max_images=8, max_body_bytes=200_000)
    for label, body, status, fragment in bad_requests():
        got, answer = post(url, body)
        assert got == status, (label, got, answer)
        assert fragment in (answer["error"] if isinstance(answer, dict) else answer), (label, answer)
    assert post(url, b"", path="/score", method="GET")[0] == 405
    assert counting.calls == 0                      # nothing bad reached the reward
    status, answer = post(url, float32_body(torch.full((1, 2, 2, 3), 0.25), ["ok"]))
    assert status == 200 and answer["scores"] == [0.25]
    assert post(url, None, path="/info", method="GET")[1]["reward"] == "brightness"


def test_the_png_pixel_budget_bounds_what_a_small_body_decodes_to(serve):
    counting = CountingReward()
    url = serve(counting, max_images=64, max_body_bytes=200_000)
    info = post(url, None, path="/info", method="GET")[1]
    assert info["max_pixels"] == 200_000 // 12
    bomb = png_body(*[(128, 128)] * 64)              # 64 small PNGs: ~1 MiB decoded, from a body of ~10 kB
    assert len(bomb) < 20_000
    status, answer = post(url, bomb)
    assert status == 413 and "images.data[0..1] decode to 32768 pixels" in answer["error"], answer
    status, answer = post(url, png_body((128, 64), (128, 64)))          # 16384 pixels: within the budget
    assert status == 200 and answer["scores"] == [0.0, 0.0], answer
    assert counting.calls == 1


def test_a_failing_reward_answers_500_once_and_the_client_names_it(serve):
    failing = CountingReward(fail=True)
    url = serve(failing)
    remote = RemoteReward(url, retries=3, backoff=0.01)
    with pytest.raises(RewardServerError, match="HTTP 500: reward 'brightness' failed: RuntimeError: the judge "
                                                "model ran out of memory"):
        remote.score(torch.rand(1, 4, 4, 3), ["a"])
    assert failing.calls == 1                       # a 500 is not retried
    failing.fail = False
    assert remote.score(torch.full((1, 4, 4, 3), 0.5), ["a"]).tolist() == [0.5]


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """A protocol server answering 503 to the first `failures` score requests."""
    failures, score_requests = 2, 0

    def log_message(self, *args):
        pass

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"protocol": 1, "reward": "flaky", "max_images": 8, "max_body_bytes": 2 ** 20})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).score_requests += 1
        if type(self).score_requests <= type(self).failures:
            self._send(503, {"error": "warming up"})
        else:
            self._send(200, {"scores": [1.0] * len(body["prompts"])})


def test_unavailable_answers_are_retried_then_reported():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        FlakyHandler.failures, FlakyHandler.score_requests = 2, 0
        assert RemoteReward(url, retries=2, backoff=0.01).score(torch.rand(2, 2, 2, 3), ["a", "b"]).tolist() == [1, 1]
        assert FlakyHandler.score_requests == 3
        FlakyHandler.failures, FlakyHandler.score_requests = 10, 0
        with pytest.raises(RewardServerError, match=r"not reachable \(HTTP 503: warming up; tried 2 times"):
            RemoteReward(url, retries=1, backoff=0.01).score(torch.rand(1, 2, 2, 3), ["a"])
        assert FlakyHandler.score_requests == 2
    finally:
        server.shutdown()


def test_a_slow_server_times_out_with_a_clear_error(serve):
    url = serve(CountingReward(delay=1.5))
    remote = RemoteReward(url, timeout=0.3, retries=0)
    with pytest.raises(RewardServerError, match=r"not reachable \(timed out; tried 1 times, timeout 0.3 s\)"):
        remote.score(torch.rand(1, 2, 2, 3), ["a"])


def test_a_server_that_is_down_is_reported_before_any_work(tmp_path, capsys, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RewardServerError, match="is not reachable .*serve-reward --reward NAME"):
        RemoteReward(url, retries=1, backoff=0.01)
    with pytest.raises(ValueError, match="not an http"):
        create_reward("http://")
    with pytest.raises(ValueError, match="takes no path: the server loads the model"):
        create_reward(url, path="weights.safetensors")
    monkeypatch.setattr(model_loading, "load_backend", lambda *a, **k: pytest.fail("model loaded"))
    code = cli.main(["train", "--out", str(tmp_path / "run"), "--reward", url])
    lines = capsys.readouterr().err.splitlines()
    # the loading's progress line, then one error line
    assert code == 2 and lines[0].startswith("loading the reward") and len(lines) == 2, lines
    assert lines[1].startswith("error: reward server") and "not reachable" in lines[1], lines


def test_training_through_a_server_equals_training_with_the_local_reward(serve, tmp_path):
    url = serve(BrightnessReward())
    config = toy_config(epochs=2)
    remote = Trainer(ToyBackend(), create_reward(url), PROMPTS, config, out_dir=tmp_path / "remote").run()
    local = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, config, out_dir=tmp_path / "local").run()
    assert [m["reward_mean"] for m in remote.metrics] == [m["reward_mean"] for m in local.metrics]
    remote_lora, meta = load_lora(remote.lora_path)
    local_lora, _ = load_lora(local.lora_path)
    assert all(torch.equal(remote_lora[k], local_lora[k]) for k in local_lora)


def test_serve_reward_command_listens_on_loopback_and_scores():
    process = subprocess.Popen([sys.executable, "-m", "comfyui_prdp", "serve-reward", "--reward",
                                "jpeg-incompressibility", "--port", "0"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert match, (line, process.stderr.read() if process.poll() is not None else "")
        images = torch.rand(2, 16, 16, 3)
        scores = create_reward(match.group(1)).score(images, ["a", "b"])
        assert torch.equal(scores, create_reward("jpeg-incompressibility").score(images, ["a", "b"]))
    finally:
        process.terminate()
        code = process.wait(30)
    assert code == 0, process.stderr.read()          # SIGTERM ends it cleanly
    refused = subprocess.run([sys.executable, "-m", "comfyui_prdp", "serve-reward", "--reward", "nope",
                              "--port", "0"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.startswith("error: unknown reward 'nope'"), refused.stderr


def test_load_reward_node_takes_a_server_url(serve):
    node = load_plugin_package().NODE_CLASS_MAPPINGS["PRDPLoadRewardModel"]
    url = serve(create_reward("jpeg-compressibility"))
    assert node.VALIDATE_INPUTS(reward="pickscore", weights="(auto)", device="auto", dtype="auto",
                                server_url=url) is True
    with pytest.raises(ValueError, match="server_url: reward URL 'ftp://x' is not an http"):
        node.VALIDATE_INPUTS(reward="pickscore", weights="(auto)", device="auto", dtype="auto", server_url="ftp://x")
    (reward,) = node().load("pickscore", "(auto)", "auto", "auto", server_url=url)
    assert reward.name == "jpeg-compressibility"
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RuntimeError, match="not reachable") as caught:   # the package's own RewardServerError
        node().load("pickscore", "(auto)", "auto", "auto", server_url=down)
    assert type(caught.value).__name__ == "RewardServerError"


def test_cli_trains_through_a_server_and_resume_reports_it_down(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(model_loading, "load_backend", lambda *a, **k: ToyBackend(image_size=64))
    server = RewardServer(create_reward("jpeg-compressibility"), "127.0.0.1", 0)
    url = server.start()
    out = tmp_path / "run"
    try:
        code = cli.main(["train", "--out", str(out), "--reward", url, "--epochs", "1", "--steps", "3",
                         "--prompts-per-epoch", "2", "--images-per-prompt", "2", "--updates-per-epoch", "1",
                         "--checkpoint-every", "1"])
        err = capsys.readouterr().err
        assert code == 0, err
    finally:
        server.stop()
    record = json.loads((out / "config.json").read_text())
    assert record["reward"] == url and (out / "lora.safetensors").exists()
    code = cli.main(["train", "--out", str(out), "--resume", "--epochs", "2", "--reward", url])
    errors = [line for line in capsys.readouterr().err.splitlines()
              if not line.startswith(("note: ", "loading the reward"))]      # (progress of the loading)
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: reward server") and \
        "not reachable" in errors[0], errors
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch_00001"]   # nothing written
