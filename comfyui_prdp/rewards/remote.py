"""A reward scored by a server (`python -m comfyui_prdp serve-reward`), named by its URL:
`--reward http://127.0.0.1:8190` or the Load Reward Model node's server_url.

The server is asked for its /info when the reward is made, so a server that is down, or is no
PRDP reward server, is reported at once, before any model work. Scoring sends the images as raw
float32 (exact: the server scores the very values the trainer has) in batches the server
accepts, with a timeout per request; connection failures, timeouts and 502/503/504 answers are
retried (`retries` times, with a growing pause), a 4xx or 500 answer is not (it would fail
again) and raises with the server's message. Protocol: docs/reward-protocol.md.
"""
from __future__ import annotations

import base64
import http.client
import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Tuple

import torch

from .base import Reward

PROTOCOL = 1
RETRY_STATUSES = (502, 503, 504)
DEFAULT_TIMEOUT = 600.0
INFO_TIMEOUT = 10.0


class RewardServerError(RuntimeError):
    """The reward server is unreachable, refused a request, or answered something unusable."""


def is_reward_url(name: Any) -> bool:
    return isinstance(name, str) and name.lower().startswith(("http://", "https://"))


def check_reward_url(url: str) -> str:
    """The URL without a trailing '/', or ValueError naming what is wrong with it."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"reward URL {url!r} is not an http(s) address; give e.g. http://127.0.0.1:8190")
    try:
        parsed.port
    except ValueError:
        raise ValueError(f"reward URL {url!r} has a bad port; give e.g. http://127.0.0.1:8190") from None
    if parsed.query or parsed.fragment or parsed.username:
        raise ValueError(f"reward URL {url!r}: give only scheme, host, port and path, e.g. http://127.0.0.1:8190")
    return url.rstrip("/")


class RemoteReward(Reward):
    """Scores through a reward server; `name` is the server's reward name."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT, retries: int = 3, backoff: float = 0.5):
        self.url = check_reward_url(url)
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout={timeout!r}: give a number of seconds > 0")
        if not (isinstance(retries, int) and retries >= 0):
            raise ValueError(f"retries={retries!r}: give a whole number >= 0")
        self.timeout, self.retries, self.backoff = float(timeout), retries, float(backoff)
        info = self._request("GET", "/info", None, timeout=min(self.timeout, INFO_TIMEOUT))
        if not isinstance(info, dict) or info.get("protocol") != PROTOCOL or not isinstance(info.get("reward"), str):
            raise RewardServerError(f"{self.url} is not a comfyui-prdp reward server (protocol {PROTOCOL}); start "
                                    "one with: python -m comfyui_prdp serve-reward --reward NAME")
        self.name = info["reward"]
        self.max_images = max(1, int(info.get("max_images", 1)))
        self.max_body_bytes = int(info.get("max_body_bytes", 2 ** 20))

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r}, reward={self.name!r})"

    def score(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        return self.score_with_components(images, prompts)[0]

    def score_with_components(self, images: torch.Tensor, prompts: List[str]
                              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        images = images.detach().float().cpu().contiguous()
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images of shape {list(images.shape)}: expected [B, H, W, 3]")
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images; give one prompt per image")
        per_image = images[0].numel() * 4 * 4 // 3 + 1024      # base64 float32 and the prompt
        batch = max(1, min(self.max_images, (self.max_body_bytes - 4096) // per_image))
        totals, parts = [], {}
        for start in range(0, len(images), batch):
            chunk, chunk_prompts = images[start:start + batch], list(prompts[start:start + batch])
            answer = self._request("POST", "/score", self._body(chunk, chunk_prompts), timeout=self.timeout)
            scores, components = self._parse(answer, len(chunk))
            totals.append(scores)
            for name, values in components.items():
                parts.setdefault(name, []).append(values)
        total = torch.cat(totals)
        return total, {name: torch.cat(values) for name, values in parts.items()}

    # --- the wire -----------------------------------------------------------------------
    @staticmethod
    def _body(images: torch.Tensor, prompts: List[str]) -> bytes:
        data = images.numpy().astype("<f4").tobytes()
        return json.dumps({"prompts": prompts, "images": {"encoding": "float32", "shape": list(images.shape),
                                                          "data": base64.b64encode(data).decode("ascii")}}).encode()

    def _parse(self, answer: Any, count: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        def floats(values, what):
            if (not isinstance(values, list) or len(values) != count
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in values)):
                raise RewardServerError(f"{self.url} answered {what} that are not {count} finite numbers")
            return torch.tensor(values, dtype=torch.float32)
        if not isinstance(answer, dict):
            raise RewardServerError(f"{self.url} answered something that is not a JSON object")
        scores = floats(answer.get("scores"), "scores")
        components = answer.get("components") or {self.name: answer.get("scores")}
        if not isinstance(components, dict):
            raise RewardServerError(f"{self.url} answered components that are not an object")
        return scores, {str(name): floats(values, f"component {name!r}") for name, values in components.items()}

    def _request(self, method: str, path: str, body, timeout: float):
        """The parsed JSON answer; retries what may pass, raises RewardServerError otherwise."""
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url + path, data=body, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as error:
                message = _error_message(error)
                if error.code not in RETRY_STATUSES:
                    raise RewardServerError(f"reward server {self.url} refused {method} {path}: HTTP {error.code}: "
                                            f"{message}") from None
                last = f"HTTP {error.code}: {message}"
            except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError,
                    ConnectionError) as error:       # down, reset, cut short or too slow: try again
                reason = getattr(error, "reason", error)
                last = "timed out" if isinstance(reason, (socket.timeout, TimeoutError)) else str(reason)
            except ValueError:
                raise RewardServerError(f"reward server {self.url} answered {method} {path} with something that "
                                        "is not JSON; is it a comfyui-prdp reward server?") from None
        raise RewardServerError(f"reward server {self.url} is not reachable ({last}; tried {self.retries + 1} times, "
                                f"timeout {timeout:g} s): start it with `python -m comfyui_prdp serve-reward "
                                f"--reward NAME --port {urllib.parse.urlsplit(self.url).port or 80}`, or check the URL")


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read().decode("utf-8"))
        return str(body.get("error", body))[:500]
    except Exception:  # noqa: BLE001  (no JSON body: the reason phrase will do)
        return str(error.reason)


def create_remote_reward(url: str, **kwargs) -> RemoteReward:
    """A RemoteReward; options other than timeout/retries/backoff are refused (the server
    loads the model: its weights, device and dtype are the server's flags)."""
    allowed = {"timeout", "retries", "backoff"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"a reward URL takes no {', '.join(unknown)}: the server loads the model, so give those "
                         "to `serve-reward` (e.g. --reward-path there)")
    return RemoteReward(url, **kwargs)
