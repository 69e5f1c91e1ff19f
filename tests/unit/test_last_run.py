"""What the dashboard needs to show a finished run again (issue 22 sections 2 and 4), without
ComfyUI: the registry's last run of a node of a workflow, the kept samples and end message, the
pair-agreement metric, the sane-range warnings, and no LoRA for a run stopped before epoch 1.

The browser side (reload, tab switch, ComfyUI's cache) is in tests/comfy/server/test_comfy_dashboard.py."""
import importlib
import itertools
import math
import threading

import pytest
import torch

from comfy_inprocess import PACKAGE_NAME, load_plugin_package
from comfyui_prdp.service import routes
from comfyui_prdp.service.jobs import DELIVERED, JobRegistry
from comfyui_prdp.objective import pair_agreement
from comfyui_prdp.trainer import Trainer
from test_trainer import PROMPTS, toy_config
from toy_backend import BrightnessReward, ToyBackend

load_plugin_package()                          # the node modules, imported as ComfyUI imports them
workflow_id = importlib.import_module(f"{PACKAGE_NAME}.nodes.common").workflow_id
progress = importlib.import_module(f"{PACKAGE_NAME}.nodes.train_progress")
CLIP_FRAC_WARN_ABOVE, KL_WARN_ABOVE = progress.CLIP_FRAC_WARN_ABOVE, progress.KL_WARN_ABOVE
end_message, metric_warnings = progress.end_message, progress.metric_warnings


def finished_job(registry, node, workflow, epochs=2):
    job = registry.create(name=f"n{node}", info={"node": node, "workflow": workflow, "epochs": epochs})

    def target(job):
        for epoch in range(1, epochs + 1):
            job.record({"type": "epoch", "epoch": epoch, "metrics": {"epoch": epoch, "reward_mean": 0.1 * epoch}})
            job.keep_samples(epoch, [{"src": f"data:image/jpeg;base64,{epoch}", "reward": 0.1 * epoch, "prompt": "p"}])
        job.outputs["message"] = f"finished: {epochs} of {epochs} epochs; LoRA: prdp/x.safetensors"
        return None

    registry.launch(job, target)
    assert job.wait(10)
    return job


def test_last_run_is_the_newest_job_of_that_node_of_that_workflow_with_its_samples_and_message():
    registry = JobRegistry()
    older = finished_job(registry, "5", "wf-a")
    newer = finished_job(registry, "5", "wf-a", epochs=3)
    finished_job(registry, "5", "wf-b")        # same node id, another workflow tab
    finished_job(registry, "7", "wf-a")        # another node of the same workflow
    status, body = routes.last_run("5", "wf-a", registry)
    assert status == 200 and body["id"] == newer.id != older.id
    assert [m["epoch"] for m in body["metrics"]] == [1, 2, 3]
    assert body["samples_epoch"] == 3 and body["samples"][0]["src"].endswith(",3")
    assert body["outputs"]["message"].startswith("finished: 3 of 3")
    assert routes.last_run("5", "wf-b", registry)[1]["id"] not in (older.id, newer.id)
    assert routes.last_run("9", "wf-a", registry)[0] == 404
    assert routes.last_run("5", None, registry)[0] == 404       # a workflow id must match too
    # bad queries are refused with what to send, and the samples never reach the job list
    assert routes.last_run(None, "wf-a", registry)[0] == 400
    assert routes.last_run("5", "x" * 65, registry)[0] == 400
    assert all("samples" not in job for job in routes.list_jobs(registry)[1]["jobs"])


def test_the_run_a_cached_output_comes_from_is_the_newest_that_delivered_its_outputs():
    """A later run that ended without outputs (Cancel, an error) leaves ComfyUI's cache holding
    the earlier run's outputs: that is the run shown for a cached re-queue."""
    registry = JobRegistry()
    delivered = finished_job(registry, "5", "wf")
    delivered.outputs[DELIVERED] = True
    interrupted = finished_job(registry, "5", "wf")
    assert routes.last_run("5", "wf", registry)[1]["id"] == interrupted.id
    assert routes.last_run("5", "wf", registry, delivered=True)[1]["id"] == delivered.id
    assert routes.last_run("5", "other", registry, delivered=True)[0] == 404


def test_an_epoch_without_samples_keeps_the_previous_ones():
    job = JobRegistry().create()
    job.keep_samples(1, [{"src": "a"}])
    job.keep_samples(2, [])
    assert job.snapshot()["samples"] == [{"src": "a"}] and job.snapshot()["samples_epoch"] == 1


def test_workflow_id_comes_from_extra_pnginfo_and_is_bounded():
    assert workflow_id({"workflow": {"id": "0b1c-uuid"}}) == "0b1c-uuid"
    assert workflow_id(None) is None and workflow_id({"workflow": {}}) is None
    assert workflow_id({"workflow": {"id": "x" * 65}}) is None and workflow_id({"workflow": {"id": 3}}) is None


def brute_force_agreement(s, rewards):
    """Reference: every ordered pair with r_i > r_j, by loops."""
    score, count = 0.0, 0
    for group_s, group_r in zip(s.tolist(), rewards.tolist()):
        for i, j in itertools.permutations(range(len(group_r)), 2):
            if group_r[i] > group_r[j]:
                count += 1
                score += 1.0 if group_s[i] > group_s[j] else 0.5 if group_s[i] == group_s[j] else 0.0
    return score / count, count


def test_pair_agreement_counts_the_pairs_the_model_ranks_as_the_reward_does():
    generator = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    logp_ref = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    rewards = torch.tensor([[0.1, 0.4, 0.4, 0.9], [1.0, 0.0, 0.5, 0.2], [0.3, 0.3, 0.3, 0.3]], dtype=torch.float64)
    fraction, count = pair_agreement(logp, logp_ref, rewards)
    expected, expected_count = brute_force_agreement((logp - logp_ref).mean(-1), rewards)
    assert count == expected_count == 5 + 6 and fraction == pytest.approx(expected)
    # the base model itself (s = 0 everywhere) is exactly chance; a model that ranks by the reward, 1
    assert pair_agreement(logp_ref, logp_ref, rewards)[0] == 0.5
    assert pair_agreement(logp_ref + rewards[..., None], logp_ref, rewards)[0] == 1.0
    assert math.isnan(pair_agreement(logp, logp_ref, torch.zeros(3, 4))[0])


def test_the_trainer_reports_pair_agreement_and_keeps_the_loss():
    result = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config(epochs=3, updates_per_epoch=1)).run()
    first, *later = result.metrics
    assert first["pair_agreement"] == 0.5       # one update from the base model: no preference yet
    assert all(0.0 <= m["pair_agreement"] <= 1.0 for m in later) and {m["pair_agreement"] for m in later} != {0.5}
    assert all(math.isfinite(m["loss"]) for m in result.metrics)
    ddpo = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config(epochs=1, algorithm="ddpo")).run()
    assert "pair_agreement" not in ddpo.metrics[0]      # DDPO predicts no reward difference (no bare NaN)


def test_warnings_name_kl_and_clip_fraction_outside_their_ranges():
    assert metric_warnings({"kl": 1.1, "clip_frac": 0.06}) == []       # a cpu-smoke run's last epoch
    assert metric_warnings(None) == [] and metric_warnings({"kl": None}) == []
    high = metric_warnings({"kl": 234.0, "clip_frac": 0.9})
    assert len(high) == 2 and high[0].startswith("kl 234 > ") and "learning_rate" in high[0]
    assert high[1].startswith("clip 0.90 > ")
    assert metric_warnings({"kl": KL_WARN_ABOVE, "clip_frac": CLIP_FRAC_WARN_ABOVE}) == []
    assert metric_warnings({"kl": float("inf")})


def test_a_stop_before_the_first_epoch_ends_writes_no_lora_and_says_nothing_was_trained(tmp_path):
    stop = threading.Event()
    stop.set()
    lora_path = tmp_path / "loras" / "early.safetensors"
    trainer = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config(epochs=3), out_dir=tmp_path / "run",
                      stop_event=stop, lora_path=lora_path)
    result = trainer.run()
    assert result.stopped and result.epochs_done == 0
    assert result.lora_path is None and not lora_path.parent.exists()
    assert end_message("stopped", 0, 3) == "stopped before epoch 1 of 3 finished: nothing was trained"
    assert end_message("stopped", 2, 3) == "stopped at epoch 2 of 3"
