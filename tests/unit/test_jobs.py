"""The background job runner and the /prdp/ route handlers (no ComfyUI needed)."""
import asyncio
import json
import threading
import time

import pytest
import torch

from comfyui_prdp.service import routes
from comfyui_prdp.config import TrainConfig
from comfyui_prdp.service.jobs import FAILED, FINISHED, STOPPED, JobRegistry
from comfyui_prdp.trainer import Trainer
from toy_backend import BrightnessReward, ToyBackend


def drain(job, timeout=30.0):
    """All events of a finished job, in order."""
    assert job.wait(timeout), "job did not finish in time"
    events = []
    while True:
        event = job.next_event()
        if event is None:
            return events
        events.append(event)


def test_job_thread_has_inference_mode_off_and_grad_on_even_when_started_from_inference_mode():
    registry = JobRegistry()
    seen = {}

    def target(job):
        seen["inference"] = torch.is_inference_mode_enabled()
        seen["grad"] = torch.is_grad_enabled()
        weight = torch.ones(3, requires_grad=True)
        (weight * 2).sum().backward()
        return weight.grad.tolist()

    with torch.inference_mode(), torch.no_grad():   # what ComfyUI's worker thread looks like
        job = registry.start(target, name="mode")
        assert job.wait(10)
    assert seen == {"inference": False, "grad": True}
    assert job.status == FINISHED and job.result == [2.0, 2.0, 2.0]


def test_events_are_recorded_in_order_and_the_snapshot_is_json_safe():
    registry = JobRegistry()

    def target(job):
        job.record({"type": "phase", "epoch": 1, "phase": "sampling"})
        job.record({"type": "step", "epoch": 1, "phase": "sampling", "step": 1, "total": 4, "progress": 0.25})
        job.record({"type": "epoch", "epoch": 1, "metrics": {"epoch": 1, "reward_mean": 1.5, "kl": float("nan")},
                    "preview": torch.zeros(2, 8, 8, 3)})
        job.record({"type": "checkpoint", "epoch": 1, "path": "/runs/x/checkpoints/epoch_00001"})
        return "ok"

    job = registry.start(target, name="events", info={"lr": 1e-4})
    events = drain(job)
    assert [e["type"] for e in events] == ["phase", "step", "epoch", "checkpoint", "job_end"]
    assert events[-1]["status"] == FINISHED
    snap = job.snapshot()
    text = json.dumps(snap, allow_nan=False)       # NaN became null, no tensors
    assert json.loads(text)["metrics"][0]["kl"] is None
    assert snap["metrics"][0]["reward_mean"] == 1.5 and snap["epoch"] == 1
    assert snap["checkpoints"] == ["/runs/x/checkpoints/epoch_00001"]
    assert snap["progress"] == 1.0 and snap["info"] == {"lr": 1e-4}
    assert events[2]["preview"].shape == (2, 8, 8, 3)
    assert job.preview is None     # dropped when the job ends (finished jobs stay in the registry)


def test_stop_request_reaches_the_target_and_marks_the_job_stopped():
    registry = JobRegistry()
    started = threading.Event()

    def target(job):
        started.set()
        while not job.stop_event.wait(0.01):
            pass
        return "stopped cleanly"

    job = registry.start(target)
    assert started.wait(5)
    assert job.request_stop() is True
    assert job.wait(5)
    assert job.status == STOPPED and job.result == "stopped cleanly"
    assert job.request_stop() is False   # already over


def test_a_failing_target_is_reported_not_raised():
    registry = JobRegistry()

    def target(job):
        raise ValueError("bad reward")

    job = registry.start(target)
    events = drain(job)
    assert job.status == FAILED
    assert job.error == "ValueError: bad reward"
    assert isinstance(job.exception, ValueError)
    assert events[-1] == {"type": "job_end", "status": FAILED}


def test_registry_only_looks_up_well_formed_known_ids_and_forgets_old_finished_jobs():
    registry = JobRegistry(keep_finished=2)
    jobs = [registry.start(lambda job: None) for _ in range(4)]
    for job in jobs:
        job.wait(5)
    registry.start(lambda job: None).wait(5)      # starting prunes the finished ones
    kept = registry.jobs()
    assert len(kept) <= 3 and jobs[0] not in kept
    assert registry.get(kept[-1].id) is kept[-1]
    for bad in ("../../etc/passwd", "/tmp/x", kept[-1].id.upper(), kept[-1].id + "0", "", None, 12):
        assert registry.get(bad) is None


def test_route_handlers_list_get_and_stop():
    registry = JobRegistry()
    gate = threading.Event()

    def target(job):
        job.record({"type": "epoch", "epoch": 1, "metrics": {"epoch": 1, "reward_mean": 0.5}})
        while not job.stop_event.is_set() and not gate.is_set():
            time.sleep(0.01)

    job = registry.start(target, name="routed")
    status, body = routes.list_jobs(registry)
    assert status == 200 and [j["id"] for j in body["jobs"]] == [job.id]
    assert "metrics" not in body["jobs"][0]
    assert routes.get_job("0123456789ab", registry)[0] == 404
    assert routes.get_job("../secret", registry)[0] == 404
    assert routes.stop_job("not-a-job", registry)[0] == 404
    status, body = routes.stop_job(job.id, registry)
    assert status == 202 and body["stop_requested"] is True
    assert job.wait(5)
    status, body = routes.get_job(job.id, registry)
    assert status == 200 and body["status"] == STOPPED
    assert body["metrics"] == [{"epoch": 1, "reward_mean": 0.5}]
    assert routes.stop_job(job.id, registry)[0] == 409


def test_routes_over_http():
    aiohttp = pytest.importorskip("aiohttp")
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    registry = JobRegistry()
    job = registry.start(lambda job: job.stop_event.wait(10))

    async def scenario():
        table = web.RouteTableDef()
        routes.add_routes(table, registry)
        app = web.Application()
        app.add_routes(table)
        async with TestClient(TestServer(app)) as client:
            listed = await (await client.get("/prdp/jobs")).json()
            missing = await client.get("/prdp/jobs/ffffffffffff")
            traversal = await client.get("/prdp/jobs/..%2F..%2Fetc%2Fpasswd")
            stopped = await client.post(f"/prdp/jobs/{job.id}/stop")
            return listed, missing.status, traversal.status, stopped.status, await stopped.json()

    listed, missing, traversal, stop_status, stop_body = asyncio.run(scenario())
    assert [j["id"] for j in listed["jobs"]] == [job.id]
    assert missing == 404 and traversal == 404
    assert stop_status == 202 and stop_body["id"] == job.id
    assert job.wait(5) and job.status == STOPPED


def test_trainer_in_a_job_stops_gracefully_with_a_checkpoint(tmp_path):
    """The node's flow on the toy backend: start, watch events, stop mid-run."""
    registry = JobRegistry()
    config = TrainConfig(epochs=50, prompts_per_epoch=2, images_per_prompt=2, steps=3, cfg=2.0,
                         width=32, height=32, learning_rate=1e-2, sample_batch_size=4, train_batch_size=4)
    backend = ToyBackend()

    def target(job):
        trainer = Trainer(backend, BrightnessReward(), ["a", "b"], config, out_dir=tmp_path / "run",
                          callback=job.record, stop_event=job.stop_event, lora_path=tmp_path / "lora.safetensors")
        return trainer.run()

    with torch.inference_mode():
        job = registry.start(target, name="toy")
    seen_epoch = False
    deadline = time.time() + 60
    while not seen_epoch and time.time() < deadline:
        event = job.next_event(timeout=0.1)
        seen_epoch = event is not None and event["type"] == "epoch"
    assert seen_epoch, "no epoch event within 60 s"
    job.request_stop()
    assert job.wait(30)
    assert job.status == STOPPED, job.error
    result = job.result
    assert result.stopped and 1 <= result.epochs_done < config.epochs
    assert result.checkpoint_path is not None and (result.checkpoint_path / "lora.safetensors").is_file()
    assert job.checkpoints and job.checkpoints[-1] == str(result.checkpoint_path)
    assert len(job.metrics) == result.epochs_done
