"""The command line's --out: one run per folder (a lock naming the other run's pid), folders
left before training are reusable, --resume honours the run's settings (refusing changes that
alter training, warning for harmless ones), a finished run is not trained again, and checkpoints
are checked (never unpickled) before the model loads. The toy backend stands in for the model."""
import fcntl
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from comfyui_prdp import evaluation
from comfyui_prdp.models import loading as model_loading
from comfyui_prdp import cli
from comfyui_prdp.cli import reward as cli_reward, run as cli_run
from comfyui_prdp.lora.files import load_lora
from test_checkpoints import write_pickle
from toy_backend import BrightnessReward, ToyBackend

LOCK = ".prdp_run.lock"
FLAGS = ["--width", "32", "--height", "32", "--steps", "3", "--prompts-per-epoch", "2", "--images-per-prompt", "2",
         "--updates-per-epoch", "1", "--epochs", "2", "--lora-rank", "4", "--checkpoint-every", "1", "--seed", "1"]


class Toy:
    """Counts model loads; the reward can run a check while training is under way."""

    def __init__(self):
        self.loads = 0
        self.during_training = None

    def load_backend(self, base, config, device=None, base_config=None):
        self.loads += 1
        return ToyBackend(rank=config.lora_rank)

    def make_reward(self, args):
        toy = self

        class Reward(BrightnessReward):
            def score(self, images, prompts):
                if toy.during_training is not None:
                    toy.during_training()
                return super().score(images, prompts)
        return Reward()


@pytest.fixture
def toy(monkeypatch):
    stub = Toy()
    monkeypatch.setattr(model_loading, "load_backend", stub.load_backend)
    monkeypatch.setattr(cli_reward, "make_reward", stub.make_reward)
    return stub


def run_cli(out, *extra, evaluate=False):
    return cli.main(["train", "--out", str(out), *FLAGS, *extra] + ([] if evaluate else ["--no-eval"]))


def error_line(capsys):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def snapshot(out):
    """Every file under `out` (but the lock, whose pid changes) with its size and mtime."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != LOCK}


def lora_tensors(path):
    return load_lora(path)[0]


# --------------------------------------------------------------------------- one run per folder
HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(os.path.join(sys.argv[1], ".prdp_run.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_run_into_a_busy_folder_fails_at_once_naming_the_folder_and_the_pid(tmp_path, toy, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        assert run_cli(out) == 2
        line = error_line(capsys)
        assert str(out) in line and f"pid {holder.pid}" in line and "in use" in line
        assert toy.loads == 0 and sorted(os.listdir(out)) == [LOCK]    # nothing of the busy run touched
    finally:
        holder.kill()
        holder.wait()
    assert run_cli(out) == 0          # the lock went with its process: the folder is usable
    assert (out / "lora.safetensors").is_file()


def test_the_lock_is_held_while_training(tmp_path, toy):
    out = tmp_path / "run"
    refusals = []

    def try_to_lock():
        fd = os.open(out / LOCK, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            refusals.append(False)
        except BlockingIOError:
            refusals.append(True)
        finally:
            os.close(fd)

    toy.during_training = try_to_lock
    assert run_cli(out) == 0
    assert refusals and all(refusals)
    assert (out / LOCK).read_text().strip() == str(os.getpid())


# --------------------------------------------------------------------------- stopped before training
def interrupted_before_training(out, toy, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "score_rows", interrupt)
        assert run_cli(out, evaluate=True) == 130
    assert "interrupted before training started" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [LOCK, "config.json"]


def test_a_folder_left_by_ctrl_c_before_training_is_reusable_and_resumable(tmp_path, toy, monkeypatch, capsys):
    reused, resumed = tmp_path / "reused", tmp_path / "resumed"
    for out in (reused, resumed):
        interrupted_before_training(out, toy, monkeypatch, capsys)
    assert run_cli(reused) == 0                                # a new run into it
    assert run_cli(resumed, "--resume") == 0                   # or --resume: from epoch 0
    assert "no checkpoint yet" in capsys.readouterr().err
    for out in (reused, resumed):
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
        assert load_lora(out / "lora.safetensors")[1]["epochs"] == "2"
    for key, value in lora_tensors(reused / "lora.safetensors").items():
        assert torch.equal(value, lora_tensors(resumed / "lora.safetensors")[key])


def test_ctrl_c_in_the_middle_of_an_epoch_resumes_to_the_uninterrupted_result(tmp_path, toy, monkeypatch, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    two_updates = ("--updates-per-epoch", "2", "--checkpoint-every", "0")   # only the stop writes one
    assert run_cli(full, *two_updates) == 0
    seen = []

    class CtrlCAfterEpoch2sFirstOptimizerStep(cli_run.ProgressPrinter):
        def __call__(self, event):
            super().__call__(event)
            if event["type"] == "step" and event["epoch"] == 2 and event["phase"] == "update":
                seen.append(event)
                if len(seen) == 2:          # the second update's first pass: one step was taken
                    raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(cli_run, "ProgressPrinter", CtrlCAfterEpoch2sFirstOptimizerStep)
        assert run_cli(part, *two_updates) == 130
    assert "continue with --resume" in capsys.readouterr().err
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["epoch_00001_stopped"]
    assert run_cli(part, *two_updates, "--resume") == 0
    uninterrupted = lora_tensors(full / "lora.safetensors")
    for key, value in lora_tensors(part / "lora.safetensors").items():
        assert torch.equal(value, uninterrupted[key]), key


def test_a_new_or_empty_folder_starts_without_notes(tmp_path, toy, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new", empty):
        assert run_cli(out) == 0
        assert "note:" not in capsys.readouterr().err


def test_a_folder_with_other_files_is_still_refused(tmp_path, toy, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert run_cli(out) == 2
    assert "already contains files" in error_line(capsys)
    assert (out / "notes.txt").read_text() == "my notes" and toy.loads == 0


# --------------------------------------------------------------------------- resume
def test_resume_refuses_changed_settings_listing_each_difference(tmp_path, toy, capsys):
    out = tmp_path / "run"
    assert run_cli(out) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert run_cli(out, "--resume", "--epochs", "3", "--steps", "4", "--images-per-prompt", "3",
                   "--algorithm", "ddpo", "--lora-rank", "8") == 2
    line = error_line(capsys)
    for difference in ("steps 3 -> 4", "images_per_prompt 2 -> 3", "algorithm 'prdp' -> 'ddpo'", "lora_rank 4 -> 8"):
        assert difference in line, line
    assert "epochs" not in line                      # a larger --epochs alone is allowed
    assert snapshot(out) == before and toy.loads == 1


def test_resume_refuses_other_prompts_or_reward(tmp_path, toy, capsys):
    out = tmp_path / "run"
    assert run_cli(out) == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    assert run_cli(out, "--resume", "--epochs", "3", "--prompts", str(prompts)) == 2
    assert "prompts differ" in error_line(capsys)
    assert run_cli(out, "--resume", "--epochs", "3", "--reward", "aesthetic") == 2
    assert "reward 'jpeg-compressibility' -> 'aesthetic'" in error_line(capsys)
    assert toy.loads == 1


def test_resume_with_more_epochs_continues_with_the_runs_settings_and_matches_an_uninterrupted_run(
        tmp_path, toy, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli(full, "--epochs", "3") == 0
    assert run_cli(part) == 0                      # 2 epochs
    capsys.readouterr()
    # only --epochs given: the run's own settings (steps 3, 32 px, rank 4, seed 1 ...) are reused
    assert cli.main(["train", "--out", str(part), "--resume", "--epochs", "3", "--no-eval"]) == 0
    err = capsys.readouterr().err
    assert "epochs 2 -> 3" in err and "resuming" in err
    resumed = part / "lora_00001.safetensors"
    assert load_lora(resumed)[1]["epochs"] == "3"
    assert load_lora(part / "lora.safetensors")[1]["epochs"] == "2"      # the first LoRA is kept
    uninterrupted = lora_tensors(full / "lora.safetensors")
    for key, value in lora_tensors(resumed).items():
        assert torch.equal(value, uninterrupted[key]), key
    lines = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]


def test_resume_with_a_memory_knob_changed_warns_and_continues(tmp_path, toy, capsys):
    out = tmp_path / "run"
    assert run_cli(out) == 0
    assert run_cli(out, "--resume", "--epochs", "3", "--train-batch-size", "3") == 0
    assert "train_batch_size 16 -> 3" in capsys.readouterr().err


def test_resuming_a_finished_run_says_so_and_writes_nothing(tmp_path, toy, capsys):
    out = tmp_path / "run"
    assert run_cli(out) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert run_cli(out, "--resume") == 0
    assert "already finished 2 epochs" in capsys.readouterr().out
    assert snapshot(out) == before and toy.loads == 1

    plain = tmp_path / "no_checkpoints"
    assert run_cli(plain, "--checkpoint-every", "0") == 0
    before = snapshot(plain)
    capsys.readouterr()
    assert run_cli(plain, "--checkpoint-every", "0", "--resume") == 0
    assert "already finished 2 epochs" in capsys.readouterr().out
    assert run_cli(plain, "--checkpoint-every", "0", "--resume", "--epochs", "3") == 2
    assert "kept no checkpoint" in error_line(capsys)
    assert snapshot(plain) == before and toy.loads == 2


def test_a_new_run_into_a_finished_folder_is_refused_with_a_hint(tmp_path, toy, capsys):
    out = tmp_path / "run"
    assert run_cli(out) == 0
    assert run_cli(out) == 2
    assert "pass --resume" in error_line(capsys)


# --------------------------------------------------------------------------- checkpoints checked first
def test_resume_refuses_a_pickled_checkpoint_before_the_model_loads(tmp_path, toy, capsys):
    out = tmp_path / "run"
    marker = tmp_path / "pwned"
    write_pickle(out / "checkpoints" / "epoch_00001" / "trainer_state.pt", marker)
    try:
        code = run_cli(out, "--resume")
    except Exception as error:          # the marker is checked first, whatever happened
        code = error
    assert not marker.exists(), "--resume ran code from a pickle"
    assert code == 2
    line = error_line(capsys)
    assert "pickle" in line and "trainer_state.pt" in line
    assert toy.loads == 0


def test_resume_with_a_damaged_checkpoint_errors_before_the_model_loads(tmp_path, toy, capsys):
    out = tmp_path / "run"
    assert run_cli(out, "--epochs", "1") == 0
    state = out / "checkpoints" / "epoch_00001" / "trainer_state.json"
    state.write_text(state.read_text()[:20])
    assert run_cli(out, "--resume", "--epochs", "2") == 2
    line = error_line(capsys)
    assert str(state) in line and "truncated" in line
    assert toy.loads == 1


def test_resume_skips_a_damaged_newest_checkpoint_and_says_so(tmp_path, toy, capsys):
    out = tmp_path / "run"
    assert run_cli(out) == 0
    newest = out / "checkpoints" / "epoch_00002" / "optimizer.safetensors"
    newest.write_bytes(b"")
    capsys.readouterr()
    assert run_cli(out, "--resume") == 0
    err = capsys.readouterr().err
    assert "from epoch_00001" in err and "skipping epoch_00002" in err
    assert load_lora(out / "lora_00001.safetensors")[1]["epochs"] == "2"


# --------------------------------------------------------------------------- --list-rewards
def test_list_rewards_needs_no_output_folder_and_training_still_does(capsys):
    from comfyui_prdp.rewards import available_rewards

    assert cli.main(["train", "--list-rewards"]) == 0
    assert capsys.readouterr().out.split() == list(available_rewards())
    assert cli.main(["train", "--epochs", "1"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --out is required: the output folder of the run, "
                                               "e.g. --out runs/my_run")
