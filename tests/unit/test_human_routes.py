"""The human reward's HTTP routes (service/ballot_routes.py) on a real aiohttp server: the open
ballot, its images, answers, and every malformed request's 4xx with a message naming the
problem; an answered ballot 409; two concurrent answers, one 200 and one 409. Fast tier (no
trainer, no ComfyUI)."""
import json
import threading

import pytest
import torch

from comfyui_prdp.rewards.human import BallotBox, read_preferences
from comfyui_prdp.service.jobs import JobRegistry
from human_helpers import Server, post_json, request

PROMPTS = ["a red apple", "a blue sky"]
B = 4


@pytest.fixture
def setup(tmp_path):
    registry = JobRegistry()
    job = registry.create(name="human")
    box = BallotBox(tmp_path)
    images = torch.rand(len(PROMPTS) * B, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    ballot = box.open(1, PROMPTS, images, B, seed=3, noise_seeds=[[1, 2, 3, 4], [5, 6, 7, 8]])
    job.ballot_box = box
    server = Server(registry)
    yield server.base, job, box, ballot, images, tmp_path
    server.close()


def url(base, job, ballot_id=None):
    return f"{base}/prdp/jobs/{job.id}/ballot" + (f"/{ballot_id}" if ballot_id else "")


def test_get_ballot_and_its_images(setup):
    base, job, box, ballot, images, run_dir = setup
    status, body = request(url(base, job))
    assert status == 200
    assert body["id"] == ballot.id and body["epoch"] == 1 and body["prompts"] == PROMPTS
    assert len(body["images"]) == 2 and len(body["images"][0]) == B
    status, png = request(base + body["images"][1][3])
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png == (run_dir / "preferences/epoch_00001/prompt_01_image_03.png").read_bytes()
    for bad, code in (("/image/2/0", 404), ("/image/0/4", 404), ("/image/0/x", 404), ("/image/../0", 404)):
        status, error = request(url(base, job, ballot.id) + bad)
        assert status == code, bad
    status, error = request(f"{url(base, job, 'A' * 22)}/image/0/0")
    assert status == 404 and "unknown ballot" in error["error"]


@pytest.mark.parametrize("body, code, message", [
    (b"not json", 400, "not JSON"),
    (b"[1, 2]", 400, "must be an object"),
    (json.dumps({"answers": [{"best": 0, "worst": 1}]}).encode(), 400, "expected 2 answers"),
    (json.dumps({"answers": [{"best": 0, "worst": 4}, {"skip": True}]}).encode(), 400, "answers[0]: worst index 4 is out of range"),
    (json.dumps({"answers": [{"skip": True}, {"order": [1, 2, 1]}]}).encode(), 400, "answers[1]: order lists image(s) [1] more than once"),
    (json.dumps({"answers": [{"best": 2, "worst": 2}, {"skip": True}]}).encode(), 400, "same image"),
    (json.dumps({"answers": [{"best": "2", "worst": 0}, {"skip": True}]}).encode(), 400, "integer"),
    (json.dumps({"answers": "best"}).encode(), 400, "must be a list"),
    (json.dumps({"answers": [], "extra": 1}).encode(), 400, "unknown key"),
    (b"{" + b" " * 70000 + b"}", 413, "larger than"),
])
def test_malformed_answers_get_4xx_naming_the_problem(setup, body, code, message):
    base, job, box, ballot, _, run_dir = setup
    status, error = request(url(base, job, ballot.id), body)
    assert status == code and message in error["error"], (status, error)
    assert not ballot.answered and read_preferences(run_dir) == []


def test_unknown_job_and_ballot_and_stale_ballot(setup):
    base, job, box, ballot, images, _ = setup
    answers = {"answers": [{"skip": True}, {"skip": True}]}
    status, error = post_json(f"{base}/prdp/jobs/0123456789ab/ballot/{ballot.id}", answers)
    assert status == 404 and "unknown job" in error["error"]
    status, error = request(f"{base}/prdp/jobs/0123456789ab/ballot")
    assert status == 404 and "unknown job" in error["error"]
    status, error = post_json(url(base, job, "B" * 22), answers)
    assert status == 404 and "unknown ballot" in error["error"]
    newer = box.open(2, PROMPTS, images.flip(0), B)          # the next epoch's ballot
    status, error = post_json(url(base, job, ballot.id), answers)
    assert status == 410 and "newer one" in error["error"]
    assert request(url(base, job))[1]["id"] == newer.id


def test_answer_then_409_and_the_record(setup):
    base, job, box, ballot, _, run_dir = setup
    given = [{"best": 3, "worst": 0}, {"order": [2, 0]}]
    status, body = post_json(url(base, job, ballot.id), {"answers": given})
    assert status == 200 and body["ballot"] == ballot.id
    assert ballot.event.is_set() and ballot.answers == given
    status, error = post_json(url(base, job, ballot.id), {"answers": given})
    assert status == 409 and "answered already" in error["error"]
    assert request(url(base, job))[0] == 404                  # nothing waits now
    lines = read_preferences(run_dir)
    assert [line["prompt"] for line in lines] == PROMPTS
    assert lines[0]["rewards"] == [-1.0, 0.0, 0.0, 1.0] and lines[0]["ranks"] == [3, 2, 2, 1]
    assert lines[1]["rewards"] == [0.0, -1.0, 1.0, -1.0] and lines[1]["answer"] == {"order": [2, 0]}
    assert lines[1]["images"][2] == "preferences/epoch_00001/prompt_01_image_02.png"
    assert lines[0]["noise_seeds"] == [1, 2, 3, 4] and lines[0]["seed"] == 3 and lines[0]["epoch"] == 1
    assert lines[0]["ballot"] == ballot.id and lines[0]["answered_at"]
    assert json.loads((run_dir / "preferences/pending.json").read_text())["answered"] is True


def test_two_concurrent_answers_one_wins(setup):
    base, job, box, ballot, _, run_dir = setup
    barrier = threading.Barrier(4)
    statuses = []

    def answer(k):
        barrier.wait()
        statuses.append(post_json(url(base, job, ballot.id), {"answers": [{"best": k, "worst": 3 - k},
                                                                           {"skip": True}]})[0])
    threads = [threading.Thread(target=answer, args=(k,)) for k in (0, 1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(statuses) == [200, 409, 409, 409]
    assert len(read_preferences(run_dir)) == 2                # one ballot's lines, once


def test_job_without_a_ballot_box(tmp_path):
    registry = JobRegistry()
    job = registry.create(name="pickscore run")
    server = Server(registry)
    try:
        status, error = request(f"{server.base}/prdp/jobs/{job.id}/ballot")
        assert status == 404 and "not the human reward" in error["error"]
    finally:
        server.close()
