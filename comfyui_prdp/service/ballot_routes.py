"""HTTP routes of the human reward's ballots (rewards/human/), under /prdp/ beside routes.py:

    GET  /prdp/jobs/{job_id}/ballot                      the open ballot, or 404
    GET  /prdp/jobs/{job_id}/ballot/{ballot_id}/image/{prompt}/{image}
                                                         one of its images (PNG)
    POST /prdp/jobs/{job_id}/ballot/{ballot_id}          {"answers": [one per prompt]}

An answer per prompt: {"best": i, "worst": j}, {"order": [i, j, ...]} (best first) or
{"skip": true} (rewards/human/choices.py). Only a registered job's ballot box is asked, by the
ids it gave out; the image a client gets is the file the job wrote for (ballot, prompt, image),
looked up by index: nothing from the client is used as a path. Malformed requests get a 4xx
with {"error": message naming the problem}: unknown job or ballot 404, an earlier ballot 410,
an answered one 409, a body over MAX_BODY_BYTES 413, anything else 400.
"""
from __future__ import annotations

import json
import re
from typing import Any, Dict, Optional, Tuple

from .jobs import JOBS, JobRegistry

MAX_BODY_BYTES = 64 * 1024
BALLOT_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


def _box(job_id: str, registry: JobRegistry):
    job = registry.get(job_id)
    if job is None:
        return None, (404, {"error": "unknown job id"})
    box = getattr(job, "ballot_box", None)
    if box is None:
        return None, (404, {"error": "this job asks no one: its reward is not the human reward"})
    return box, None


def image_url(job_id: str, ballot_id: str, prompt: int, image: int) -> str:
    return f"/prdp/jobs/{job_id}/ballot/{ballot_id}/image/{prompt}/{image}"


def get_ballot(job_id: str, registry: JobRegistry = JOBS) -> Tuple[int, Dict[str, Any]]:
    box, problem = _box(job_id, registry)
    if problem:
        return problem
    ballot = box.describe()
    if ballot is None:
        return 404, {"error": "no ballot is waiting for an answer now"}
    B = ballot["images_per_prompt"]
    ballot["job"] = job_id
    ballot["images"] = [[image_url(job_id, ballot["id"], k, i) for i in range(B)]
                        for k in range(len(ballot["prompts"]))]
    ballot["answer_url"] = f"/prdp/jobs/{job_id}/ballot/{ballot['id']}"
    return 200, ballot


def ballot_image(job_id: str, ballot_id: str, prompt: Any, image: Any,
                 registry: JobRegistry = JOBS) -> Tuple[int, Any]:
    """(200, Path) of the image, or (4xx, {"error": ...})."""
    box, problem = _box(job_id, registry)
    if problem:
        return problem
    if not isinstance(ballot_id, str) or not BALLOT_ID.match(ballot_id):
        return 404, {"error": "unknown ballot id"}
    try:
        prompt, image = int(prompt), int(image)
    except (TypeError, ValueError):
        return 400, {"error": "prompt and image must be integer indices"}
    status, found = box.image_file(ballot_id, prompt, image)
    return (status, found) if status == 200 else (status, {"error": found})


def answer_ballot(job_id: str, ballot_id: str, body: Optional[bytes],
                  registry: JobRegistry = JOBS) -> Tuple[int, Dict[str, Any]]:
    """`body`: the raw request body (None: it was longer than MAX_BODY_BYTES)."""
    box, problem = _box(job_id, registry)
    if problem:
        return problem
    if not isinstance(ballot_id, str) or not BALLOT_ID.match(ballot_id):
        return 404, {"error": "unknown ballot id"}
    if body is None:
        return 413, {"error": f"the request body is larger than {MAX_BODY_BYTES} bytes"}
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return 400, {"error": "the body is not JSON; send {\"answers\": [...one per prompt...]}"}
    if not isinstance(data, dict) or "answers" not in data:
        return 400, {"error": "the body must be an object {\"answers\": [...one per prompt...]}"}
    extra = sorted(set(data) - {"answers"})
    if extra:
        return 400, {"error": f"unknown key(s) {', '.join(map(repr, extra))}; send only answers"}
    return box.answer(ballot_id, data["answers"])


async def read_body(request, limit: int = MAX_BODY_BYTES) -> Optional[bytes]:
    """The request's body, or None when it is longer than `limit` (read no further than that)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    data = b""
    while len(data) <= limit:
        chunk = await request.content.read(limit + 1 - len(data))
        if not chunk:
            return data
        data += chunk
    return None


def add_ballot_routes(routes, registry: JobRegistry = JOBS) -> None:
    """Attach the ballot handlers to an aiohttp RouteTableDef."""
    from aiohttp import web

    def respond(result):
        status, body = result
        return web.json_response(body, status=status)

    @routes.get("/prdp/jobs/{job_id}/ballot")
    async def _ballot(request):
        return respond(get_ballot(request.match_info["job_id"], registry))

    @routes.get(r"/prdp/jobs/{job_id}/ballot/{ballot_id}/image/{prompt:\d{1,4}}/{image:\d{1,4}}")
    async def _image(request):
        info = request.match_info
        status, found = ballot_image(info["job_id"], info["ballot_id"], info["prompt"], info["image"], registry)
        if status != 200:
            return respond((status, found))
        return web.FileResponse(found, headers={"Content-Type": "image/png", "Cache-Control": "no-store"})

    @routes.post("/prdp/jobs/{job_id}/ballot/{ballot_id}")
    async def _answer(request):
        info = request.match_info
        body = await read_body(request)
        return respond(answer_ballot(info["job_id"], info["ballot_id"], body, registry))
