"""Held-out evaluation during training (heldout.py): the split, eval/ metrics on the current
LoRA, evaluation leaving training unchanged, best/ kept by held-out reward (and across a
resume), the early stop on reward hacking, the curve's second line and the CLI's checks."""
import json
import shutil

import numpy as np
import pytest
import torch

from comfyui_prdp.runs import checkpoints
from comfyui_prdp import cli
from comfyui_prdp.models import loading as model_loading
from comfyui_prdp.evaluation import SEED_STRIDE, score_rows
from comfyui_prdp.heldout import (BEST_RECORD, FIRST_EVAL_SEED, HeldOutMonitor, HeldOutSet, best_checkpoint,
                                  held_out_split)
from comfyui_prdp.lora.files import load_lora
from comfyui_prdp.runs.plots import HELD_OUT, reward_curve
from comfyui_prdp.prompts import PromptSet, open_prompt_file
from comfyui_prdp.trainer import Trainer
from test_trainer import toy_config
from toy_backend import BrightnessReward, ToyBackend

PROMPTS = [f"prompt {i}" for i in range(10)]


def eval_config(**overrides):
    return toy_config(**{"epochs": 3, "eval_every": 1, "eval_prompts": 2, "eval_seeds": 2, **overrides})


def trainer_with_held_out(config, out_dir=None, reward=None, prompts=PROMPTS):
    train, held = held_out_split(prompts, config)
    trainer = Trainer(ToyBackend(), reward or BrightnessReward(), train, config, out_dir=out_dir)
    trainer.held_out = HeldOutMonitor(held, config)
    return trainer, held


def metrics_file(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_split_is_fixed_disjoint_and_lazy_for_prompt_sets(tmp_path):
    config = eval_config(eval_prompts=3)
    train, held = held_out_split(PROMPTS, config)
    again, held_again = held_out_split(PROMPTS, config)
    assert held.prompts == held_again.prompts and train == again
    assert sorted(train + held.prompts) == sorted(PROMPTS) and not set(train) & set(held.prompts)
    assert len(held.prompts) == 3 and held.per_prompt == 2
    first = FIRST_EVAL_SEED
    assert held.rows() == ([p for p in held.prompts for _ in range(2)],
                           [first, first + 1, first + SEED_STRIDE, first + SEED_STRIDE + 1,
                            first + 2 * SEED_STRIDE, first + 2 * SEED_STRIDE + 1])
    assert held_out_split(PROMPTS, config.replace(seed=7))[1].prompts != held.prompts
    path = tmp_path / "p.txt"
    path.write_text("\n".join(PROMPTS))
    lazy_train, lazy_held = held_out_split(open_prompt_file(path), config)
    assert isinstance(lazy_train, PromptSet) and list(lazy_train) == train and lazy_held.prompts == held.prompts
    assert held_out_split(PROMPTS, config.replace(eval_every=0)) == (PROMPTS, None)
    with pytest.raises(ValueError, match="eval_prompts=10: .* give 1 to 9"):
        held_out_split(PROMPTS, config.replace(eval_prompts=10))
    file_train, from_file = held_out_split(PROMPTS, config.replace(eval_prompts=0), ["x", "y"])
    assert file_train == PROMPTS and from_file.prompts == ["x", "y"]


def test_eval_metrics_score_the_current_lora_and_leave_training_unchanged(tmp_path):
    config = eval_config(epochs=3, eval_every=2)
    trainer, held = trainer_with_held_out(config, tmp_path / "eval")
    result = trainer.run()
    lines = metrics_file(tmp_path / "eval")
    assert ["eval/reward_mean" in m for m in lines] == [False, True, True]   # every 2 epochs and the last
    # the reference: the final LoRA in a fresh backend, the same pairs, scored independently
    fresh = ToyBackend()
    state, _ = load_lora(result.lora_path)
    fresh.load_lora_state_dict(state)
    rewards, _ = score_rows(fresh, BrightnessReward(), *held.rows(), config)
    assert lines[-1]["eval/reward_mean"] == pytest.approx(rewards.mean().item(), abs=1e-6)
    assert lines[-1]["eval/reward_std"] == pytest.approx(rewards.std(unbiased=False).item(), abs=1e-6)
    assert lines[-1]["eval/train_reward_mean"] == pytest.approx(lines[-1]["reward_mean"])   # epoch 3 alone
    assert lines[1]["eval/train_reward_mean"] == pytest.approx((lines[0]["reward_mean"] + lines[1]["reward_mean"]) / 2)
    # training with the same prompts and no evaluation gives the same LoRA
    plain = Trainer(ToyBackend(), BrightnessReward(), held_out_split(PROMPTS, config)[0],
                    config.replace(eval_every=0), out_dir=tmp_path / "plain").run()
    plain_state, _ = load_lora(plain.lora_path)
    for key in state:
        assert torch.equal(state[key], plain_state[key]), key
    assert [m["reward_mean"] for m in metrics_file(tmp_path / "plain")] == [m["reward_mean"] for m in lines]


def test_best_checkpoint_is_the_best_held_out_epoch(tmp_path):
    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    (out / "best" / "notes.txt").write_text("mine")           # a user's file is never touched
    trainer, _ = trainer_with_held_out(eval_config(epochs=4, checkpoint_every=1), out)
    trainer.run()
    lines = metrics_file(out)
    scores = [m["eval/reward_mean"] for m in lines]
    best_epoch = 1 + max(range(len(scores)), key=scores.__getitem__)
    found = checkpoints.list_checkpoints(out / "best")
    assert len(found) == 1 and found[0] == best_checkpoint(out) and found[0].name == f"epoch_{best_epoch:05d}"
    assert (out / "best" / "notes.txt").read_text() == "mine"
    record = json.loads((out / "best" / BEST_RECORD).read_text())
    assert record["epoch"] == best_epoch and record["eval/reward_mean"] == pytest.approx(max(scores))
    assert all(m["eval/best_epoch"] == 1 + max(range(i + 1), key=scores.__getitem__) for i, m in enumerate(lines))
    # its LoRA is the one the periodic checkpoint of that epoch holds
    best_lora, _ = load_lora(found[0] / checkpoints.LORA_FILE)
    same_epoch = checkpoints.read_checkpoint(out / "checkpoints" / f"epoch_{best_epoch:05d}")
    for key, value in same_epoch.lora.items():
        assert torch.equal(best_lora[key], value), key
    data = checkpoints.read_checkpoint(found[0])
    assert data.epoch == best_epoch and data.extra["held_out"]["best"]["epoch"] == best_epoch


def test_resume_keeps_the_best_so_far(tmp_path):
    config = eval_config(epochs=4, checkpoint_every=1)
    full, _ = trainer_with_held_out(config, tmp_path / "full")
    full.run()
    first, _ = trainer_with_held_out(config.replace(epochs=2), tmp_path / "part")
    first.run()
    resumed, _ = trainer_with_held_out(config, tmp_path / "part")
    resumed.run(resume_from=checkpoints.latest_checkpoint(tmp_path / "part"))
    keys = ("eval/reward_mean", "eval/best_reward_mean", "eval/best_epoch", "eval/divergence_strikes")
    assert [[m[k] for k in keys] for m in metrics_file(tmp_path / "part")] == \
           [[m[k] for k in keys] for m in metrics_file(tmp_path / "full")]
    assert resumed.held_out.state_dict() == full.held_out.state_dict()
    assert best_checkpoint(tmp_path / "part").name == best_checkpoint(tmp_path / "full").name


def test_early_stop_counts_held_out_falls_while_training_rises():
    monitor = HeldOutMonitor(HeldOutSet(["a"], 1), eval_config(early_stop_patience=2))
    monitor.observe(1, eval_mean=1.0, train_mean=0.0)
    monitor.observe(2, eval_mean=0.5, train_mean=-1.0)     # both fell: not the hacking signal
    assert monitor.strikes == 0 and not monitor.stopped_early
    monitor.observe(3, eval_mean=0.9, train_mean=0.5)      # held-out below best, training above: 1
    assert monitor.strikes == 1 and not monitor.stopped_early
    metrics = monitor.observe(4, eval_mean=1.5, train_mean=0.6)   # a new best resets
    assert monitor.strikes == 0 and metrics["eval/is_best"] and monitor.best["epoch"] == 4
    monitor.observe(5, eval_mean=1.2, train_mean=0.7)
    assert not monitor.stopped_early
    monitor.observe(6, eval_mean=1.1, train_mean=0.8)
    assert monitor.strikes == 2 and monitor.stopped_early
    never = HeldOutMonitor(HeldOutSet(["a"], 1), eval_config(early_stop_patience=0))
    for epoch in range(1, 6):
        never.observe(epoch, eval_mean=-epoch, train_mean=epoch)
    assert never.strikes == 4 and not never.stopped_early


class HackableReward(BrightnessReward):
    """Brightness on the training prompts, darkness on the held-out ones: optimising the first
    lowers the second, as a hacked reward does."""

    def __init__(self, held_out):
        super().__init__()
        self.held_out = set(held_out)

    def score(self, images, prompts):
        signs = torch.tensor([-1.0 if p in self.held_out else 1.0 for p in prompts])
        return signs * images.float().mean(dim=(1, 2, 3)).cpu()


def test_training_stops_early_when_the_held_out_reward_is_hacked(tmp_path):
    config = eval_config(epochs=8, updates_per_epoch=2, learning_rate=0.05, clip_range=0.5, beta=0.01,
                         early_stop_patience=2)
    held = held_out_split(PROMPTS, config)[1]
    trainer, _ = trainer_with_held_out(config, tmp_path, reward=HackableReward(held.prompts))
    result = trainer.run()
    lines = metrics_file(tmp_path)
    assert result.early_stopped and not result.stopped and result.epochs_done < 8, lines
    assert lines[-1]["eval/divergence_strikes"] == 2 and lines[-1]["epoch"] == result.epochs_done
    assert lines[-1]["reward_mean"] > lines[0]["reward_mean"]              # training reward rose
    assert lines[-1]["eval/reward_mean"] < lines[-1]["eval/best_reward_mean"]
    assert checkpoints.latest_checkpoint(tmp_path).name == f"epoch_{result.epochs_done:05d}"
    assert result.lora_path.exists()
    assert best_checkpoint(tmp_path).name == f"epoch_{lines[-1]['eval/best_epoch']:05d}"


def test_a_malformed_held_out_state_is_refused():
    monitor = HeldOutMonitor(HeldOutSet(["a"], 1), eval_config())
    with pytest.raises(checkpoints.CheckpointError, match="held-out state is malformed"):
        monitor.load_state_dict({"evaluations": [{"epoch": 1, "eval": float("nan"), "train": 0.0}]})
    with pytest.raises(ValueError, match="non-finite"):
        monitor.observe(1, float("inf"), 0.0)


def count_colour(image, colour):
    return int((np.asarray(image) == np.array(colour)).all(-1).sum())


def test_reward_curve_shows_the_held_out_line():
    metrics = [{"epoch": e, "reward_mean": 0.1 * e, "reward_std": 0.05} for e in range(1, 6)]
    assert count_colour(reward_curve(metrics), HELD_OUT) == 0
    for m in metrics[1::2]:
        m["eval/reward_mean"] = 0.6 - 0.1 * m["epoch"]
    assert count_colour(reward_curve(metrics), HELD_OUT) > 50


def run_cli(argv, capsys, monkeypatch):
    monkeypatch.setattr(model_loading, "load_backend", lambda *a, **k: pytest.fail("model loaded"))
    code = cli.main(["train", *argv])
    return code, capsys.readouterr().err


def test_cli_refuses_held_out_settings_that_cannot_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    evals = tmp_path / "eval.txt"
    evals.write_text("a wolf\n")
    code, err = run_cli(["--out", str(out), "--eval-prompts-file", str(evals)], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "needs --eval-every" in err, err
    code, err = run_cli(["--out", str(out), "--eval-every", "2", "--eval-prompts", "12"], capsys, monkeypatch)
    assert code == 2 and "eval_prompts=12" in err and "give 1 to 11" in err, err
    code, err = run_cli(["--out", str(out), "--early-stop-patience", "2"], capsys, monkeypatch)
    assert code == 2 and "set eval_every too" in err, err
    assert not out.exists()


def test_cli_trains_with_held_out_evaluation_and_resume_keeps_the_best(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(model_loading, "load_backend", lambda *a, **k: ToyBackend(image_size=64))
    out = tmp_path / "run"
    small = ["--steps", "3", "--prompts-per-epoch", "2", "--images-per-prompt", "2", "--updates-per-epoch", "1"]
    code = cli.main(["train", "--out", str(out), "--epochs", "2", "--eval-every", "1", "--eval-prompts", "3",
                     "--checkpoint-every", "1", "--no-eval", *small])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "held-out after epoch 2: reward" in printed.out
    first = metrics_file(out)
    assert [m["epoch"] for m in first] == [1, 2] and all("eval/reward_mean" in m for m in first)
    assert best_checkpoint(out).name == f"epoch_{first[-1]['eval/best_epoch']:05d}"
    assert (out / "reward_curve.png").exists()
    code = cli.main(["train", "--out", str(out), "--resume", "--epochs", "3"])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = metrics_file(out)
    assert lines[:2] == first and len(lines) == 3
    scores = [m["eval/reward_mean"] for m in lines]
    assert lines[-1]["eval/best_epoch"] == 1 + max(range(3), key=scores.__getitem__)
    assert best_checkpoint(out).name == f"epoch_{lines[-1]['eval/best_epoch']:05d}"


def test_cli_resume_needs_the_same_evaluation_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(model_loading, "load_backend", lambda *a, **k: ToyBackend(image_size=64))
    evals = tmp_path / "eval.jsonl"
    evals.write_text('{"prompt": "a wolf"}\n{"prompt": "a crow"}\n')
    out = tmp_path / "run"
    code = cli.main(["train", "--out", str(out), "--epochs", "1", "--eval-every", "1", "--eval-prompts-file",
                     str(evals), "--checkpoint-every", "1", "--no-eval", "--steps", "2", "--prompts-per-epoch", "2",
                     "--images-per-prompt", "2", "--updates-per-epoch", "1"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((best_checkpoint(out) / "../best.json").read_text())
    assert record["pairs"]["prompts"] == ["a wolf", "a crow"]
    capsys.readouterr()
    # without the file the held-out prompts would be split off the training set: refused
    code = cli.main(["train", "--out", str(out), "--resume", "--epochs", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "eval_prompts_file" in err and f"pass --eval-prompts-file {evals}" in err, err
    code = cli.main(["train", "--out", str(out), "--resume", "--epochs", "2", "--eval-prompts-file", str(evals)])
    assert code == 0, capsys.readouterr().err
    assert [m["epoch"] for m in metrics_file(out)] == [1, 2]


def test_an_evaluation_file_that_repeats_training_prompts_is_noted(tmp_path, capsys, monkeypatch):
    from comfyui_prdp.heldout import shared_prompts

    assert shared_prompts(["a", "b", "c", "b"], HeldOutSet(["b", "z"], 1)) == 2
    assert shared_prompts(["a"], HeldOutSet(["z"], 1)) == 0
    monkeypatch.setattr(model_loading, "load_backend", lambda *a, **k: ToyBackend(image_size=64))
    evals = tmp_path / "eval.txt"
    evals.write_text(f"{cli.DEFAULT_PROMPTS[0]}\na wolf\n")
    code = cli.main(["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--eval-every", "1",
                     "--eval-prompts-file", str(evals), "--no-eval", "--steps", "2", "--prompts-per-epoch", "2",
                     "--images-per-prompt", "2", "--updates-per-epoch", "1"])
    err = capsys.readouterr().err
    assert code == 0 and f"note: 1 training prompt(s) are also in {evals}" in err, err


class ScheduledHeldOutReward(BrightnessReward):
    """Brightness for training images; `values[epoch]` for every held-out image (the epoch is set
    by the trainer's held-out phase event), so each evaluation's mean is chosen by the test."""

    def __init__(self, held_prompts, values):
        super().__init__()
        self.held, self.values, self.epoch = set(held_prompts), values, None

    def score(self, images, prompts):
        if all(p in self.held for p in prompts):
            return torch.full((len(prompts),), self.values[self.epoch])
        return super().score(images, prompts)


def scheduled_trainer(config, out, values):
    trainer, held = trainer_with_held_out(config, out)
    trainer.reward = ScheduledHeldOutReward(held.prompts, values)

    def on_event(event):
        if event.get("phase") == "held-out evaluation":
            trainer.reward.epoch = event["epoch"]
    trainer.callback = on_event
    return trainer


def test_resume_from_before_the_best_keeps_the_better_best(tmp_path):
    out = tmp_path / "run"
    config = eval_config(epochs=3, checkpoint_every=1)
    scheduled_trainer(config, out, {1: 0.1, 2: 0.2, 3: 0.9}).run()
    assert best_checkpoint(out).name == "epoch_00003"
    best_lora = (best_checkpoint(out) / checkpoints.LORA_FILE).read_bytes()
    for name in ("epoch_00002", "epoch_00003"):      # killed after best/epoch_00003, before its checkpoint
        shutil.rmtree(out / "checkpoints" / name)
    resumed = scheduled_trainer(config.replace(epochs=2), out, {2: 0.5})   # above epoch 1's 0.1, below 0.9
    resumed.run(resume_from=checkpoints.latest_checkpoint(out))
    assert metrics_file(out)[-1]["eval/reward_mean"] == pytest.approx(0.5)
    assert metrics_file(out)[-1]["eval/is_best"] is False and metrics_file(out)[-1]["eval/best_epoch"] == 3
    assert resumed.held_out.best == {"epoch": 3, "eval": pytest.approx(0.9), "train": pytest.approx(
        json.loads((out / "best" / BEST_RECORD).read_text())["train_reward_mean"])}
    assert [p.name for p in checkpoints.list_checkpoints(out / "best")] == ["epoch_00003"]
    assert (best_checkpoint(out) / checkpoints.LORA_FILE).read_bytes() == best_lora
    assert json.loads((out / "best" / BEST_RECORD).read_text())["epoch"] == 3


def test_a_best_above_the_new_one_is_never_replaced(tmp_path):
    out = tmp_path / "run"
    config = eval_config(epochs=2)
    scheduled_trainer(config, out, {1: 0.2, 2: 0.9}).run()
    again = scheduled_trainer(config, out, {1: 0.5, 2: 0.95})   # a fresh run into the same folder
    again.held_out.observe(1, 0.5, 0.0)                         # its own best: 0.5, below best.json's 0.9
    assert again.held_out.save_best(again) is None
    assert [p.name for p in checkpoints.list_checkpoints(out / "best")] == ["epoch_00002"]
    again.held_out.observe(2, 0.95, 0.0)                        # above it: replaces it
    assert again.held_out.save_best(again).name == "epoch_00000"
    assert [p.name for p in checkpoints.list_checkpoints(out / "best")] == ["epoch_00000"]
    assert json.loads((out / "best" / BEST_RECORD).read_text())["eval/reward_mean"] == pytest.approx(0.95)
