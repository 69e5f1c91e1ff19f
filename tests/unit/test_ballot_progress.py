"""While the human reward waits for a person, the train node's progress (nodes/train_progress.py)
tells the dashboard: prdp.status carries the open ballot's id, the phase reads "waiting for your
choice (N of N prompts left)" and the ETA is paused; the wait does not count as training time.
Once the ballot is answered the next event says so at once (ballot null, ETA running)."""
from __future__ import annotations

import importlib
import sys
import types

import pytest

from comfy_inprocess import load_plugin_package
from comfyui_prdp.rewards.human.reward import waiting_phase


@pytest.fixture(scope="module")
def progress_module():
    package = load_plugin_package()
    return importlib.import_module(f"{package.__name__}.nodes.train_progress")


@pytest.fixture(scope="module")
def jobs_module():
    package = load_plugin_package()
    return importlib.import_module(f"{package.__name__}.comfyui_prdp.service.jobs")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_eta_clock_leaves_out_the_time_a_person_takes(progress_module):
    clock = Clock()
    eta = progress_module.EtaClock(clock)
    assert eta.eta(0.0) is None
    clock.now = 10.0
    assert eta.eta(0.1) == pytest.approx(90.0)
    eta.pause()
    clock.now = 110.0
    assert eta.paused and eta.eta(0.1) is None
    eta.resume()
    clock.now = 120.0
    assert not eta.paused
    assert eta.eta(0.2) == pytest.approx(20.0 * 0.8 / 0.2)       # 100 s of choosing left out


class FakeBox:
    """describe() as BallotBox's: the open ballot, or None once answered."""

    def __init__(self, ballot_id):
        self.ballot_id = ballot_id

    def describe(self):
        return None if self.ballot_id is None else {"id": self.ballot_id, "prompts": ["a", "b"]}


@pytest.fixture
def progress(progress_module, jobs_module, monkeypatch):
    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            pass

        def update_absolute(self, *args):
            pass

    utils.ProgressBar = ProgressBar
    comfy.utils = utils
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    sent = []
    monkeypatch.setattr(progress_module, "send_event", lambda event, data: sent.append((event, data)))
    job = jobs_module.Job("human", {"workflow": "w"})
    clock = Clock()
    made = progress_module.ComfyProgress(job, "3", 2, clock=clock)
    made.sent, made.clock_ = sent, clock
    return made


def statuses(progress):
    return [data for event, data in progress.sent if event == "prdp.status"]


def test_status_names_the_open_ballot_pauses_the_eta_and_says_how_many_prompts_are_left(progress):
    job = progress.job
    job.ballot_box = FakeBox("ballot-1")
    for event in ({"type": "step", "epoch": 1, "progress": 0.1, "phase": "sampling"},):
        job.record(event)
        progress.forward(event)
    progress.clock_.now = 5.0
    event = {"type": "step", "epoch": 1, "progress": 0.2, "phase": "sampling"}
    job.record(event)
    progress.forward(event)
    assert progress.eta_seconds == pytest.approx(5.0 * 0.8 / 0.1)

    for event in ({"type": "ballot", "epoch": 1, "ballot": "ballot-1", "prompts": 2},
                  {"type": "phase", "epoch": 1, "phase": waiting_phase(2)}):      # what the reward says
        job.record(event)
        progress.forward(event)
    waiting = statuses(progress)[-1]
    assert waiting["ballot"] == "ballot-1" and waiting["eta_paused"] is True, waiting
    assert waiting["phase"] == "waiting for your choice (2 of 2 prompts left)", waiting
    assert job.snapshot()["phase"] == "waiting for your choice (2 of 2 prompts left)"

    progress.clock_.now = 500.0          # the person takes their time, then answers
    job.ballot_box.ballot_id = None
    event = {"type": "step", "epoch": 1, "progress": 0.3, "phase": "updating"}
    job.record(event)
    progress.forward(event)
    after = statuses(progress)[-1]
    assert after["ballot"] is None and after["eta_paused"] is False and after["phase"] == "updating", after
    assert progress.eta_seconds < 100, f"the wait counted as training time: ETA {progress.eta_seconds}"


def test_a_run_without_a_ballot_box_sends_no_ballot(progress):
    event = {"type": "phase", "epoch": 1, "phase": "sampling"}
    progress.job.record(event)
    progress.forward(event)
    assert statuses(progress)[-1]["ballot"] is None and statuses(progress)[-1]["eta_paused"] is False


def test_the_run_ending_while_a_ballot_waits_takes_it_away(progress):
    progress.job.ballot_box = FakeBox("ballot-2")
    progress.forward({"type": "ballot", "epoch": 1, "ballot": "ballot-2", "prompts": 2})
    assert statuses(progress)[-1]["ballot"] == "ballot-2"
    progress.forward({"type": "checkpoint", "epoch": 0})       # stopped: the ballot is still open
    assert progress.ballot == "ballot-2"
    progress.forward({"type": "job_end", "status": "stopped"})
    assert progress.ballot is None and not progress.eta.paused
