"""ComfyUI's HTTP API for tests: JSON requests, object_info, history, interrupt, output files."""
from __future__ import annotations

import json
import urllib.parse
import urllib.request
from typing import Any, Mapping


class PromptRejected(RuntimeError):
    """POST /prompt answered with an error (validation failed); ``.body`` holds the JSON."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        super().__init__(f"prompt rejected (HTTP {status}): {json.dumps(body)[:4000]}")


def http_json(method: str, url: str, payload: Any = None, timeout: float = 30) -> Any:
    """Send a request, return the decoded JSON answer (HTTPError propagates)."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def get_json(base_url: str, path: str, timeout: float = 30) -> Any:
    return http_json("GET", base_url.rstrip("/") + path, timeout=timeout)


def get_object_info(base_url: str) -> dict:
    return get_json(base_url, "/object_info", timeout=120)


def get_history(base_url: str, prompt_id: str) -> dict | None:
    return get_json(base_url, f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)


def interrupt(base_url: str, prompt_id: str | None = None) -> None:
    """Press Cancel: interrupt the running prompt (only ``prompt_id`` if given)."""
    http_json("POST", base_url.rstrip("/") + "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})


def fetch_output_file(base_url: str, item: Mapping[str, str]) -> bytes:
    """Bytes of an output entry such as ``{"filename", "subfolder", "type"}`` via GET /view."""
    query = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{base_url.rstrip('/')}/view?{query}", timeout=60) as response:
        return response.read()
