"""The human reward in training on the toy backend (tests/toy_backend.py), answered through the
HTTP routes: a scripted chooser gives the same LoRA as the rule written as a reward function;
Stop while waiting ends at once with a checkpoint; preferences.jsonl is kept across stop and
resume, and the unanswered ballot is asked again. Medium tier (toy trainer, a few seconds)."""
import json
import time

import torch

from comfyui_prdp.rewards.human import HumanReward, read_preferences
from comfyui_prdp.service.jobs import STOPPED, JobRegistry
from comfyui_prdp.trainer import Trainer, latest_checkpoint
from human_helpers import RuleReward, Server, chooser, request, wait_for_ballot
from toy_backend import ToyBackend

from test_trainer import PROMPTS, toy_config   # the trainer tests' toy settings

def human_job(registry, run_dir, config, resume_from=None, reward=None):
    """A job running the toy trainer with the human reward attached (as the train node does)."""
    reward = reward or HumanReward()
    job = registry.create(name="human")
    trainer = Trainer(ToyBackend(), reward, PROMPTS, config, out_dir=run_dir, callback=job.record,
                      stop_event=job.stop_event)
    reward.attach_run(trainer, job, resume_from=resume_from)
    registry.launch(job, lambda job: trainer.run(resume_from=resume_from))
    return job, trainer


def test_scripted_chooser_through_the_routes_gives_the_rule_rewards_lora(tmp_path):
    reference = Trainer(ToyBackend(), RuleReward(4), PROMPTS, toy_config(), out_dir=tmp_path / "rule")
    reference.run()
    registry = JobRegistry()
    server = Server(registry)
    try:
        job, trainer = human_job(registry, tmp_path / "human", toy_config())
        answered = chooser(server.base, job)
        assert job.wait(60) and job.error is None, job.error
    finally:
        server.close()
    assert [b["epoch"] for b in answered] == [1, 2, 3]
    expected = reference.backend.lora_state_dict()
    for key, value in trainer.backend.lora_state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert not torch.equal(expected["lora_unet_toy.lora_up.weight"], torch.zeros(1))      # it trained
    assert [m["reward_mean"] for m in job.metrics] == [m["reward_mean"] for m in reference.metrics]
    lines = read_preferences(tmp_path / "human")
    assert [(line["epoch"], line["prompt_index"]) for line in lines] == [(e, k) for e in (1, 2, 3) for k in (0, 1)]
    assert all((tmp_path / "human" / name).is_file() for line in lines for name in line["images"])


def test_stop_while_waiting_then_resume_asks_the_ballot_again_and_keeps_the_record(tmp_path):
    run_dir = tmp_path / "run"
    registry = JobRegistry()
    server = Server(registry)
    try:
        job, _ = human_job(registry, run_dir, toy_config())
        chooser(server.base, job, ballots=1)                        # epoch 1 answered
        waiting = wait_for_ballot(server.base, job, not_id=None)   # epoch 2's ballot waits
        assert waiting["epoch"] == 2
        assert job.phase == "waiting for your choice (2 of 2 prompts left)", job.phase
        time.sleep(0.2)
        start = time.monotonic()
        assert request(f"{server.base}/prdp/jobs/{job.id}/stop", b"", "POST")[0] == 202
        assert job.wait(5)
        seconds = time.monotonic() - start
        assert seconds < 1.0, seconds
        assert job.status == STOPPED and job.error is None and job.result.stopped
        checkpoint = latest_checkpoint(run_dir)
        assert checkpoint.name == "epoch_00001_stopped"
        first_lines = (run_dir / "preferences.jsonl").read_text()
        assert [line["epoch"] for line in read_preferences(run_dir)] == [1, 1]
        pending = json.loads((run_dir / "preferences/pending.json").read_text())
        assert pending["id"] == waiting["id"] and pending["answered"] is False

        # resume: a new job (as after a server restart) asks the same ballot again at once
        resumed, trainer = human_job(registry, run_dir, toy_config(), resume_from=checkpoint)
        status, again = request(f"{server.base}/prdp/jobs/{resumed.id}/ballot")
        assert status == 200 and again["id"] == waiting["id"] and again["epoch"] == 2
        answered = chooser(server.base, resumed)
        assert resumed.wait(60) and resumed.error is None, resumed.error
    finally:
        server.close()
    assert [b["epoch"] for b in answered] == [2, 3] and answered[0]["id"] == waiting["id"]
    text = (run_dir / "preferences.jsonl").read_text()
    assert text.startswith(first_lines)                            # kept, appended to
    assert [line["epoch"] for line in read_preferences(run_dir)] == [1, 1, 2, 2, 3, 3]
    # the same LoRA as the rule's uninterrupted run
    reference = Trainer(ToyBackend(), RuleReward(4), PROMPTS, toy_config(), out_dir=tmp_path / "rule")
    reference.run()
    expected = reference.backend.lora_state_dict()
    for key, value in trainer.backend.lora_state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_time_limit_skip_and_assist(tmp_path):
    """No one answers: on_timeout skip trains on equal rewards (no pairs), assist on the assist's."""
    from toy_backend import BrightnessReward
    config = toy_config(epochs=1)
    skip = HumanReward(time_limit=0.2, on_timeout="skip")
    trainer = Trainer(ToyBackend(), skip, PROMPTS, config, out_dir=tmp_path / "skip")
    skip.attach_run(trainer)
    before = trainer.backend.lora_state_dict()
    start = time.monotonic()
    result = trainer.run()
    assert time.monotonic() - start < 30 and result.epochs_done == 1
    assert result.metrics[0]["reward_std"] == 0.0 and "pair_agreement" not in result.metrics[0]
    for key, value in trainer.backend.lora_state_dict().items():
        if key.endswith("up.weight"):
            assert torch.equal(value, before[key]), key        # no pairs: the LoRA's up factor stays 0
    assert read_preferences(tmp_path / "skip") == []
    assert json.loads((tmp_path / "skip/preferences/pending.json").read_text())["closed"] == "timeout: skip"

    assist = HumanReward(assist=BrightnessReward(-1.0), assist_weight=0.5, time_limit=0.2, on_timeout="assist")
    trainer = Trainer(ToyBackend(), assist, PROMPTS, config, out_dir=tmp_path / "assist")
    assist.attach_run(trainer)
    result = trainer.run()
    metrics = result.metrics[0]
    assert metrics["reward_std"] > 0 and "reward/assist" in metrics and metrics["reward/human"] == 0.0


def test_a_run_resumed_in_a_new_folder_takes_the_record_and_the_open_ballot_along(tmp_path):
    """ComfyUI's train node starts every run, resumed ones too, in a folder of its own: the
    person's earlier choices come along and the unanswered ballot is asked again; the earlier
    folder is left as it was."""
    first_dir, resumed_dir = tmp_path / "first", tmp_path / "resumed"
    registry = JobRegistry()
    server = Server(registry)
    try:
        job, _ = human_job(registry, first_dir, toy_config())
        chooser(server.base, job, ballots=1)
        waiting = wait_for_ballot(server.base, job, not_id=None)
        assert waiting["epoch"] == 2
        assert request(f"{server.base}/prdp/jobs/{job.id}/stop", b"", "POST")[0] == 202
        assert job.wait(5) and job.status == STOPPED
        checkpoint = latest_checkpoint(first_dir)
        before = {p.relative_to(first_dir): p.read_bytes() for p in first_dir.rglob("*") if p.is_file()}

        resumed, trainer = human_job(registry, resumed_dir, toy_config(), resume_from=checkpoint)
        status, again = request(f"{server.base}/prdp/jobs/{resumed.id}/ballot")
        assert status == 200 and again["id"] == waiting["id"] and again["epoch"] == 2
        for urls in again["images"]:
            for url in urls:
                assert request(server.base + url)[0] == 200, url
        answered = chooser(server.base, resumed)
        assert resumed.wait(60) and resumed.error is None, resumed.error
    finally:
        server.close()
    assert [b["epoch"] for b in answered] == [2, 3] and answered[0]["id"] == waiting["id"]
    record = read_preferences(resumed_dir)
    assert [line["epoch"] for line in record] == [1, 1, 2, 2, 3, 3]
    assert record[:2] == read_preferences(first_dir)                 # carried as they were
    assert all((resumed_dir / name).is_file() for line in record for name in line["images"])
    after = {p.relative_to(first_dir): p.read_bytes() for p in first_dir.rglob("*") if p.is_file()}
    assert after == before, "the earlier run folder was changed"
    reference = Trainer(ToyBackend(), RuleReward(4), PROMPTS, toy_config(), out_dir=tmp_path / "rule")
    reference.run()
    expected = reference.backend.lora_state_dict()
    for key, value in trainer.backend.lora_state_dict().items():
        assert torch.equal(value, expected[key]), key
