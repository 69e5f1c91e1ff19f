"""HTTP routes under /prdp/ on ComfyUI's server (mirrored under /api/prdp/ by ComfyUI).

    GET  /prdp/jobs               running and recent jobs (summaries, latest metrics)
    GET  /prdp/jobs/{job_id}      one job with all its epoch metrics and latest samples
    GET  /prdp/last_run?node=<id>&workflow=<id>[&delivered=1]
                                  the newest job of that node of that workflow (as above), or 404;
                                  delivered=1: the newest whose node returned its outputs
    POST /prdp/jobs/{job_id}/stop ask a job to stop after the current step (it saves a checkpoint)
    GET/POST /prdp/jobs/{job_id}/ballot...  the human reward's ballots (service/ballot_routes.py)

Only ids of jobs in the registry are accepted; nothing from the client is ever used as a
path. The handlers are plain functions of the registry (testable without ComfyUI);
`register()` attaches them to PromptServer when ComfyUI's server is running.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Tuple

from .jobs import JOBS, JobRegistry

_registered = False


def server_roots() -> Dict[str, str]:
    """Absolute folders of the running ComfyUI -> the names clients see them by ({} without
    ComfyUI). Longest first, so a folder inside another is named by the inner one."""
    folder_paths = sys.modules.get("folder_paths")
    if folder_paths is None:
        return {}
    roots = {}
    for name, getter in (("output", "get_output_directory"), ("input", "get_input_directory"),
                         ("temp", "get_temp_directory")):
        try:
            roots[str(getattr(folder_paths, getter)())] = name
        except Exception:  # noqa: BLE001  (an older ComfyUI without that folder)
            pass
    models = getattr(folder_paths, "models_dir", None)
    if models:
        roots[str(models)] = "models"
    base = getattr(folder_paths, "base_path", None)
    if base:
        roots[str(base)] = "ComfyUI"
    return dict(sorted(roots.items(), key=lambda item: -len(item[0])))


def relative_paths(value: Any, roots: Dict[str, str]) -> Any:
    """`value` with every absolute server folder in its strings replaced by its client-facing
    name (e.g. /srv/ComfyUI/output/prdp_runs/x -> output/prdp_runs/x): clients of a shared
    server never learn its file layout."""
    if isinstance(value, dict):
        return {key: relative_paths(item, roots) for key, item in value.items()}
    if isinstance(value, list):
        return [relative_paths(item, roots) for item in value]
    if isinstance(value, str):
        for root, name in roots.items():
            value = value.replace(root.rstrip("/\\") + "/", name + "/").replace(root, name)
        return value
    return value


def list_jobs(registry: JobRegistry = JOBS) -> Tuple[int, Dict[str, Any]]:
    roots = server_roots()
    return 200, {"jobs": [relative_paths(job.snapshot(with_metrics=False), roots) for job in registry.jobs()]}


def get_job(job_id: str, registry: JobRegistry = JOBS) -> Tuple[int, Dict[str, Any]]:
    job = registry.get(job_id)
    if job is None:
        return 404, {"error": "unknown job id"}
    return 200, relative_paths(job.snapshot(with_metrics=True), server_roots())


MAX_ID_CHARS = 64


def last_run(node: Any, workflow: Any = None, registry: JobRegistry = JOBS,
             delivered: bool = False) -> Tuple[int, Dict[str, Any]]:
    """The newest job of node `node` in workflow `workflow` (both as the frontend names them;
    only compared with what the node recorded, never used otherwise); `delivered`: the newest
    whose node returned its outputs (the run whose outputs ComfyUI's cache replays)."""
    for name, value in (("node", node), ("workflow", workflow)):
        if value is not None and (not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS):
            return 400, {"error": f"{name}: an id of 1 to {MAX_ID_CHARS} characters"}
    if node is None:
        return 400, {"error": "node: required (the node's id in the workflow)"}
    job = registry.last_run(node, workflow, delivered)
    if job is None:
        return 404, {"error": "no run of this node is known (the server may have restarted)"}
    return 200, relative_paths(job.snapshot(with_metrics=True), server_roots())


def stop_job(job_id: str, registry: JobRegistry = JOBS) -> Tuple[int, Dict[str, Any]]:
    job = registry.get(job_id)
    if job is None:
        return 404, {"error": "unknown job id"}
    accepted = job.request_stop()
    return (202 if accepted else 409), {"id": job.id, "status": job.status, "stop_requested": accepted}


def add_routes(routes, registry: JobRegistry = JOBS) -> None:
    """Attach the handlers to an aiohttp RouteTableDef (or anything with .get/.post decorators)."""
    from aiohttp import web

    def respond(result: Tuple[int, Dict[str, Any]]):
        status, body = result
        return web.json_response(body, status=status)

    @routes.get("/prdp/jobs")
    async def _list(request):
        return respond(list_jobs(registry))

    @routes.get("/prdp/jobs/{job_id}")
    async def _get(request):
        return respond(get_job(request.match_info["job_id"], registry))

    @routes.get("/prdp/last_run")
    async def _last_run(request):
        query = request.rel_url.query
        return respond(last_run(query.get("node"), query.get("workflow") or None, registry,
                                delivered=query.get("delivered") == "1"))

    @routes.post("/prdp/jobs/{job_id}/stop")
    async def _stop(request):
        return respond(stop_job(request.match_info["job_id"], registry))

    # --- the human reward's ballots (issue 24): service/ballot_routes.py ---
    from .ballot_routes import add_ballot_routes
    add_ballot_routes(routes, registry)


def register() -> bool:
    """Add the routes to the running ComfyUI server once; False when there is none."""
    global _registered
    if _registered:
        return True
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    add_routes(instance.routes)
    _registered = True
    return True
