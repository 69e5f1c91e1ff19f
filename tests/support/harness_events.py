"""ComfyUI's websocket events for tests: one listener per server, queueing a prompt and waiting
for how it ended (success, error, interrupted) with its events and history."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from harness_http import PromptRejected, get_history, http_json


class EventListener:
    """Collects the websocket events of one client id in a background thread.

    Uses ``websocket-client`` when installed, else aiohttp (a ComfyUI requirement).
    Events are ``(type, data)`` tuples in arrival order; binary frames (previews) appear as
    ``("binary", {"bytes": n, "event": code})``.
    """

    def __init__(self, base_url: str, client_id: str | None = None, connect_timeout: float = 30,
                 backend: str = "auto"):
        if backend not in ("auto", "websocket-client", "aiohttp"):
            raise ValueError(f"backend={backend!r}: use auto, websocket-client or aiohttp")
        self.backend = backend
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.events: list[tuple[str, dict]] = []
        self._new_event = threading.Condition()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._error: BaseException | None = None
        ws_url = self.base_url.replace("http://", "ws://").replace("https://", "wss://")
        self._url = f"{ws_url}/ws?clientId={self.client_id}"
        self._thread = threading.Thread(target=self._run, name=f"comfy-ws-{self.client_id[:8]}", daemon=True)
        self._thread.start()
        if not self._connected.wait(connect_timeout):
            self.close()
            raise TimeoutError(f"websocket {self._url} did not connect: {self._error!r}")
        if self._error is not None:
            raise RuntimeError(f"websocket {self._url} failed: {self._error!r}")

    # -- reading
    def _record(self, raw: str | bytes) -> None:
        if isinstance(raw, (bytes, bytearray)):
            code = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
            event = ("binary", {"bytes": len(raw), "event": code})
        else:
            message = json.loads(raw)
            event = (message.get("type", "?"), message.get("data") or {})
        with self._new_event:
            self.events.append(event)
            self._new_event.notify_all()

    def _run(self) -> None:
        try:
            websocket = None
            if self.backend != "aiohttp":
                try:
                    import websocket  # websocket-client
                except ImportError:
                    if self.backend == "websocket-client":
                        raise
            if websocket is not None:
                self._run_websocket_client(websocket)
            else:
                self._run_aiohttp()
        except BaseException as exc:  # surfaced through connect / wait_for
            self._error = exc
        finally:
            self._connected.set()
            with self._new_event:
                self._new_event.notify_all()

    def _run_websocket_client(self, websocket) -> None:
        ws = websocket.create_connection(self._url, timeout=10)
        self._connected.set()
        ws.settimeout(0.5)
        try:
            while not self._stop.is_set():
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                except websocket.WebSocketConnectionClosedException:
                    break
                if raw in ("", b""):
                    continue
                self._record(raw)
        finally:
            ws.close()

    def _run_aiohttp(self) -> None:
        import asyncio

        import aiohttp

        async def main() -> None:
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(self._url, heartbeat=20) as ws:
                    self._connected.set()
                    while not self._stop.is_set():
                        try:
                            msg = await ws.receive(timeout=0.5)
                        except asyncio.TimeoutError:
                            continue
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            self._record(msg.data)
                        elif msg.type == aiohttp.WSMsgType.BINARY:
                            self._record(msg.data)
                        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            break

        asyncio.run(main())

    # -- API
    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait_for_event(self, predicate, timeout: float, start: int = 0) -> tuple[int, tuple[str, dict]] | None:
        """First event at index >= start matching ``predicate((type, data))``, waiting up to timeout."""
        deadline = time.monotonic() + timeout
        index = start
        with self._new_event:
            while True:
                while index < len(self.events):
                    if predicate(self.events[index]):
                        return index, self.events[index]
                    index += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return None
                self._new_event.wait(min(remaining, 0.5))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


_LISTENERS: dict[str, EventListener] = {}
_LISTENERS_LOCK = threading.Lock()
_PROMPT_LISTENER: dict[str, EventListener] = {}


def listener_for(base_url: str) -> EventListener:
    """The shared listener of ``base_url`` (connected on first use, reconnected if it died)."""
    key = base_url.rstrip("/")
    with _LISTENERS_LOCK:
        listener = _LISTENERS.get(key)
        if listener is None or not listener.alive:
            listener = EventListener(key)
            _LISTENERS[key] = listener
        return listener


def close_listeners(base_url: str) -> None:
    key = base_url.rstrip("/")
    with _LISTENERS_LOCK:
        listener = _LISTENERS.pop(key, None)
    if listener is not None:
        listener.close()


TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


@dataclass
class PromptResult:
    """How a queued prompt ended: ``status`` is "success", "error" or "interrupted"."""

    prompt_id: str
    status: str
    events: list[tuple[str, dict]] = field(default_factory=list)
    history: dict = field(default_factory=dict)
    error: dict | None = None

    @property
    def outputs(self) -> dict:
        return self.history.get("outputs", {})

    def events_of(self, prefix: str) -> list[dict]:
        """Data of events whose type equals ``prefix`` or starts with it (e.g. "prdp.")."""
        return [data for kind, data in self.events if kind == prefix or (prefix.endswith(".") and kind.startswith(prefix))]

    def describe(self) -> str:
        if self.error:
            return (f"{self.status}: node {self.error.get('node_id')} ({self.error.get('node_type')}): "
                    f"{self.error.get('exception_type')}: {self.error.get('exception_message')}\n"
                    + "".join(self.error.get("traceback") or []))
        return self.status


def queue_prompt(base_url: str, prompt: Mapping[str, Any], client_id: str | None = None,
                 extra_data: Mapping[str, Any] | None = None) -> str:
    """POST the API prompt and return its prompt_id.

    Without ``client_id`` the prompt is queued under the shared listener of ``base_url``
    (connected first, so no event is missed) and ``wait_for`` sees its websocket events.
    Raises ``PromptRejected`` with the server's node_errors when validation fails.
    """
    listener = None
    if client_id is None:
        listener = listener_for(base_url)
        client_id = listener.client_id
    payload: dict[str, Any] = {"prompt": prompt, "client_id": client_id}
    if extra_data:
        payload["extra_data"] = dict(extra_data)
    try:
        answer = http_json("POST", base_url.rstrip("/") + "/prompt", payload)
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = body.decode(errors="replace")
        raise PromptRejected(exc.code, parsed) from None
    if answer.get("node_errors"):
        raise PromptRejected(200, answer)
    prompt_id = answer["prompt_id"]
    if listener is not None:
        _PROMPT_LISTENER[prompt_id] = listener
    return prompt_id


def _status_from_history(entry: Mapping[str, Any]) -> tuple[str | None, dict | None]:
    messages = (entry.get("status") or {}).get("messages") or []
    for kind, data in messages:
        if kind == "execution_interrupted":
            return "interrupted", data
        if kind == "execution_error":
            return "error", data
        if kind == "execution_success":
            return "success", None
    status = entry.get("status") or {}
    if status.get("completed"):
        return "success", None
    if status.get("status_str") == "error":
        return "error", None
    return None, None


def wait_for(base_url: str, prompt_id: str, timeout: float = 300) -> PromptResult:
    """Wait until the prompt ends; return its status, websocket events and history entry.

    Ends on the websocket's execution_success / execution_error / execution_interrupted
    for this prompt, with /history polled each second as a fallback. The events returned
    are those carrying this prompt_id plus those without one (progress, custom "prdp.*")
    that arrived while it ran. Raises TimeoutError when it has not ended in time.
    """
    listener = _PROMPT_LISTENER.get(prompt_id)
    deadline = time.monotonic() + timeout
    status: str | None = None
    error: dict | None = None
    entry: dict | None = None

    def is_terminal(event: tuple[str, dict]) -> bool:
        return event[0] in TERMINAL_EVENTS and event[1].get("prompt_id") == prompt_id

    while status is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            recent = [e[0] for e in (listener.events[-15:] if listener else [])]
            raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s; last events {recent}")
        if listener is not None and listener.alive:
            found = listener.wait_for_event(is_terminal, timeout=min(1.0, remaining))
            if found is not None:
                kind, data = found[1]
                status = {"execution_success": "success", "execution_error": "error",
                          "execution_interrupted": "interrupted"}[kind]
                error = data if kind != "execution_success" else None
                break
        else:
            time.sleep(min(1.0, max(remaining, 0)))
        entry = get_history(base_url, prompt_id)
        if entry:
            status, error = _status_from_history(entry)
    # the history entry is written just after the terminal event is sent
    history_deadline = time.monotonic() + 30
    while entry is None and time.monotonic() < history_deadline:
        entry = get_history(base_url, prompt_id)
        if entry is None:
            time.sleep(0.2)
    events = _events_of_prompt(listener.events if listener else [], prompt_id)
    return PromptResult(prompt_id=prompt_id, status=status, events=events, history=entry or {}, error=error)


def _events_of_prompt(all_events: Iterable[tuple[str, dict]], prompt_id: str) -> list[tuple[str, dict]]:
    selected = []
    running = False
    for kind, data in list(all_events):
        own = isinstance(data, dict) and data.get("prompt_id") == prompt_id
        if kind == "execution_start" and own:
            running = True
        has_id = isinstance(data, dict) and "prompt_id" in data
        if own or (running and not has_id):
            selected.append((kind, data))
        if kind in TERMINAL_EVENTS and own:
            running = False
    return selected
