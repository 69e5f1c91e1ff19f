"""Checkpoints cannot run code and are validated: a pickle (even one disguised as a checkpoint
file) is refused without being unpickled, damaged or foreign files give a one-line error naming
the file, only folders this package wrote are listed by the node, and a round trip restores
the optimizer, RNG and extra state exactly. All on the toy backend."""
import hashlib
import json
import sys
import threading
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_inprocess import load_plugin_package
from toy_backend import BrightnessReward, ToyBackend
from test_trainer import PROMPTS, toy_config
from comfyui_prdp.trainer import Trainer


class WritesMarker:
    """Unpickling this creates the file `marker`: proof that the loader ran pickled code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pickle(path, marker):
    """A torch.save file (what the old trainer_state.pt was) that runs code when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "optimizer": WritesMarker(marker)}, path)


def refusal(call):
    """The message of the exception `call()` raises (None when it raises nothing)."""
    try:
        call()
    except Exception as error:      # checked by the caller: must be a clear ValueError
        return error
    return None


def trained_run(out, epochs=1, **overrides):
    trainer = Trainer(ToyBackend(), BrightnessReward(), PROMPTS,
                      toy_config(epochs=epochs, checkpoint_every=1, **overrides), out_dir=out)
    trainer.run()
    return trainer


def only_checkpoint(out):
    folders = [p for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1, folders
    return folders[0]


def reseal(folder):
    """Rewrite the manifest so its sizes and sha256 match the files as they are now: the
    content checks, not the hash, must catch what the test changed."""
    manifest = json.loads((folder / "prdp_checkpoint.json").read_text())
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / "prdp_checkpoint.json").write_text(json.dumps(manifest))


def fresh_trainer(out=None):
    return Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config(epochs=3), out_dir=out)


def load_error(folder):
    with pytest.raises(ValueError) as caught:
        fresh_trainer().load_checkpoint(folder)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------- no code runs
def test_a_pickled_trainer_state_is_refused_and_never_unpickled(tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "epoch_00001"
    marker = tmp_path / "pwned"
    write_pickle(folder / "trainer_state.pt", marker)
    save_file({"lora_unet_toy.lora_down.weight": torch.zeros(4, 8)}, str(folder / "lora.safetensors"))
    for target in (folder, tmp_path / "run"):      # the folder itself, and the run folder
        error = refusal(lambda: fresh_trainer().load_checkpoint(target))
        assert not marker.exists(), "the checkpoint loader ran code from a pickle"
        assert isinstance(error, ValueError) and "pickle" in str(error) and "\n" not in str(error), error


@pytest.mark.parametrize("disguised_as", ["trainer_state.json", "optimizer.safetensors", "lora.safetensors"])
def test_a_pickle_disguised_as_a_checkpoint_file_with_a_valid_manifest_is_refused(tmp_path, disguised_as):
    trained_run(tmp_path)
    folder = only_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    write_pickle(folder / disguised_as, marker)
    reseal(folder)                                  # the attacker can compute the hashes
    error = refusal(lambda: fresh_trainer().load_checkpoint(folder))
    assert not marker.exists(), "a checkpoint file was unpickled"
    assert isinstance(error, ValueError) and disguised_as in str(error) and "\n" not in str(error), error


# --------------------------------------------------------------------------- round trip
def test_round_trip_restores_weights_optimizer_rng_and_extra_state_exactly(tmp_path):
    trainer = trained_run(tmp_path / "run", epochs=2)
    trainer.extra_state = lambda: {"buffer": {"a cat": [0.25, 0.5]}}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    folder = trainer.save_checkpoint()
    assert sorted(p.name for p in folder.iterdir()) == [
        "lora.safetensors", "optimizer.safetensors", "prdp_checkpoint.json", "trainer_state.json"]

    restored = fresh_trainer(tmp_path / "other")
    received = []
    restored.load_extra_state = received.append
    torch.manual_seed(0)
    restored.load_checkpoint(folder)
    assert torch.equal(torch.get_rng_state(), rng)
    assert received == [{"buffer": {"a cat": [0.25, 0.5]}}]
    assert restored.epoch == 2 and restored.metrics == trainer.metrics
    saved, loaded = trainer.optimizer.state_dict(), restored.optimizer.state_dict()
    assert saved["state"].keys() == loaded["state"].keys() and saved["state"]
    for index, state in saved["state"].items():
        assert state.keys() == loaded["state"][index].keys()
        for name, value in state.items():
            assert torch.equal(value, loaded["state"][index][name]), (index, name)
    assert loaded["param_groups"][0]["lr"] == restored.config.learning_rate
    for key, value in trainer.backend.lora_state_dict().items():
        assert torch.equal(value, restored.backend.lora_state_dict()[key]), key


def test_a_stop_in_the_middle_of_an_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    full = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config(epochs=3), out_dir=tmp_path / "full")
    full.run()
    stop = threading.Event()
    part = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config(epochs=3), out_dir=tmp_path / "part",
                   stop_event=stop)
    optimizer_step = part.optimizer.step

    def step_then_stop_in_epoch_2(*args, **kwargs):
        result = optimizer_step(*args, **kwargs)
        if part.epoch == 1:          # one of epoch 2's two optimizer steps is done
            stop.set()
        return result

    part.optimizer.step = step_then_stop_in_epoch_2
    stopped = part.run()
    assert stopped.stopped and stopped.checkpoint_path.name == "epoch_00001_stopped"
    # the LoRA kept (and the trainer's own) is the finished epoch's, as in the checkpoint: the
    # half-done epoch's step is undone, not saved as "stopped at epoch 1"
    assert stopped.epochs_done == 1 and stopped.lora_path is not None
    kept = load_file(str(stopped.lora_path))
    in_checkpoint = load_file(str(stopped.checkpoint_path / "lora.safetensors"))
    assert kept.keys() == in_checkpoint.keys()
    assert all(torch.equal(kept[k], in_checkpoint[k]) for k in kept)
    resumed = Trainer(ToyBackend(), BrightnessReward(), PROMPTS, toy_config(epochs=3), out_dir=tmp_path / "part")
    result = resumed.run(resume_from=stopped.checkpoint_path)
    assert result.epochs_done == 3
    expected = full.backend.lora_state_dict()
    for key, value in resumed.backend.lora_state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_the_optimizer_file_holds_tensors_only_and_the_state_file_is_json(tmp_path):
    folder = only_checkpoint(trained_run(tmp_path).out_dir)
    tensors = load_file(str(folder / "optimizer.safetensors"))
    assert {k.split(".")[-1] for k in tensors if k.startswith("state.")} == {"step", "exp_avg", "exp_avg_sq"}
    assert tensors["rng.torch"].dtype == torch.uint8
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and state["partial"] is False and state["config"]["lora_rank"] == 4


# --------------------------------------------------------------------------- damaged or foreign
def test_a_changed_or_truncated_file_fails_its_manifest_check(tmp_path):
    folder = only_checkpoint(trained_run(tmp_path).out_dir)
    data = (folder / "optimizer.safetensors").read_bytes()
    (folder / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    message = load_error(folder)
    assert str(folder / "optimizer.safetensors") in message and "truncated" in message


def edit_state(folder, change):
    state = json.loads((folder / "trainer_state.json").read_text())
    change(state)
    (folder / "trainer_state.json").write_text(json.dumps(state))
    reseal(folder)


@pytest.mark.parametrize("change,expected", [
    (lambda s: s.update(epoch="1"), "epoch '1' is not an integer >= 0"),
    (lambda s: s.update(epoch=-1), "epoch -1 is not an integer >= 0"),
    (lambda s: s.update(epoch=True), "is not an integer"),
    (lambda s: s.update(metrics={"a": 1}), "metrics is not a list"),
    (lambda s: s.update(config=[1, 2]), "config is not an object"),
    (lambda s: s["config"].update(learning_rate=float("inf")), "config.learning_rate is not a finite number"),
    (lambda s: s.update(format="something else"), "not a comfyui-prdp trainer state"),
])
def test_wrong_types_in_the_state_file_give_a_one_line_error(tmp_path, change, expected):
    folder = only_checkpoint(trained_run(tmp_path).out_dir)
    edit_state(folder, change)
    message = load_error(folder)
    assert expected in message and "trainer_state.json" in message


@pytest.mark.parametrize("content,expected", [(b"", "is empty"), (b"[1, 2", "not valid JSON"),
                                              (b"\xff\xfe\x00", "not valid JSON"), (b"42", "not a comfyui-prdp")])
def test_an_empty_or_unparsable_state_file_gives_a_one_line_error(tmp_path, content, expected):
    folder = only_checkpoint(trained_run(tmp_path).out_dir)
    (folder / "trainer_state.json").write_bytes(content)
    reseal(folder)
    assert expected in load_error(folder)


def test_non_finite_or_misshapen_optimizer_state_is_refused(tmp_path):
    folder = only_checkpoint(trained_run(tmp_path).out_dir)
    original = load_file(str(folder / "optimizer.safetensors"))
    broken = dict(original, **{"state.0.exp_avg": original["state.0.exp_avg"] * float("nan")})
    save_file(broken, str(folder / "optimizer.safetensors"))
    reseal(folder)
    assert "non-finite" in load_error(folder)

    misshapen = dict(original, **{"state.1.exp_avg_sq": torch.zeros(3)})
    save_file(misshapen, str(folder / "optimizer.safetensors"))
    reseal(folder)
    assert "state.1.exp_avg_sq has shape (3,)" in load_error(folder)

    foreign = dict(original, **{"weights": torch.zeros(2)})
    save_file(foreign, str(folder / "optimizer.safetensors"))
    reseal(folder)
    assert "unexpected entry 'weights'" in load_error(folder)


def test_a_checkpoint_of_another_lora_rank_is_refused_before_anything_changes(tmp_path):
    Trainer(ToyBackend(rank=2), BrightnessReward(), PROMPTS, toy_config(epochs=1, checkpoint_every=1, lora_rank=2),
            out_dir=tmp_path).run()
    folder = only_checkpoint(tmp_path)
    trainer = Trainer(ToyBackend(rank=4), BrightnessReward(), PROMPTS, toy_config(), out_dir=None)
    before = {k: v.clone() for k, v in trainer.backend.lora_state_dict().items()}
    with pytest.raises(ValueError, match="lora_rank"):
        trainer.load_checkpoint(folder)
    for key, value in trainer.backend.lora_state_dict().items():
        assert torch.equal(value, before[key])
    assert trainer.epoch == 0


def test_a_non_finite_lora_is_not_written_and_earlier_checkpoints_stay(tmp_path):
    trainer = trained_run(tmp_path)
    with torch.no_grad():
        trainer.backend.lora.up.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or inf"):
        trainer.save_checkpoint()
    assert only_checkpoint(tmp_path).name == "epoch_00001"


def test_checkpoints_never_replace_each_other(tmp_path):
    trainer = trained_run(tmp_path)
    again = trainer.save_checkpoint()
    assert again.name == "epoch_00001_00001"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch_00001", "epoch_00001_00001"]
    resumed = fresh_trainer()
    resumed.load_checkpoint(tmp_path)
    assert resumed.epoch == 1


# --------------------------------------------------------------------------- the node's list
@pytest.fixture
def comfy_output(tmp_path, monkeypatch):
    """A stand-in for ComfyUI's folder_paths whose output folder is tmp_path/output."""
    output = tmp_path / "output"
    fake = types.SimpleNamespace(get_output_directory=lambda: str(output),
                                 get_input_directory=lambda: str(tmp_path / "input"),
                                 get_folder_paths=lambda kind: [str(tmp_path / kind)])
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    return output


@pytest.fixture(scope="module")
def node_package():
    return load_plugin_package()


def test_the_node_lists_only_checkpoints_this_package_wrote(comfy_output, node_package, tmp_path):
    train_paths = node_package.nodes.train_paths
    runs = comfy_output / "prdp_runs"
    trained_run(runs / "good")
    marker = tmp_path / "pwned"
    # what ComfyUI's /upload/image with type=output and a subfolder can leave behind
    write_pickle(runs / "evil" / "checkpoints" / "epoch_00001" / "trainer_state.pt", marker)
    (runs / "evil" / "checkpoints" / "epoch_00002").mkdir()
    (runs / "evil" / "checkpoints" / "epoch_00002" / "prdp_checkpoint.json").write_text("{}")
    (runs / "good" / "checkpoints" / ".epoch_00002.abc.tmp").mkdir()      # a staging leftover

    assert train_paths.checkpoint_choices() == ["none", "good/checkpoints/epoch_00001"]
    assert train_paths.resolve_checkpoint("good/checkpoints/epoch_00001") == runs / "good/checkpoints/epoch_00001"
    for choice in ("evil/checkpoints/epoch_00001", "evil/checkpoints/epoch_00002", "../../etc",
                   "good/checkpoints/.epoch_00002.abc.tmp"):
        with pytest.raises(ValueError, match="resume_from") as caught:
            train_paths.resolve_checkpoint(choice)
        assert "\n" not in str(caught.value)
    try:        # the form refuses by returning its message or raising it
        problem = node_package.NODE_CLASS_MAPPINGS["PRDPTrainLoRA"].VALIDATE_INPUTS(
            resume_from="evil/checkpoints/epoch_00001")
    except Exception as error:
        problem = str(error)
    assert isinstance(problem, str) and "resume_from" in problem
    assert not marker.exists(), "the node ran code from an uploaded pickle"


def test_the_node_refuses_a_damaged_listed_checkpoint_before_training(comfy_output, node_package):
    train_paths = node_package.nodes.train_paths
    trained_run(comfy_output / "prdp_runs" / "run")
    folder = comfy_output / "prdp_runs" / "run" / "checkpoints" / "epoch_00001"
    edit_state(folder, lambda s: s.update(epoch="many"))
    with pytest.raises(ValueError, match="epoch 'many' is not an integer") as caught:
        train_paths.resolve_checkpoint("run/checkpoints/epoch_00001")
    assert "\n" not in str(caught.value)
    (folder / "lora.safetensors").write_bytes(b"changed")
    assert train_paths.checkpoint_choices() == ["none"]    # no longer matches its manifest


def test_the_node_refuses_to_resume_with_settings_that_change_training(comfy_output, node_package):
    train_paths = node_package.nodes.train_paths
    trained_run(comfy_output / "prdp_runs" / "run")
    checkpoint = train_paths.resolve_checkpoint("run/checkpoints/epoch_00001")
    saved = toy_config(epochs=1, checkpoint_every=1)
    with pytest.raises(ValueError, match=r"other settings: .*steps 5 -> 7") as caught:
        train_paths.check_resume_settings(checkpoint, saved.replace(steps=7))
    assert "\n" not in str(caught.value)
    notes = train_paths.check_resume_settings(checkpoint, saved.replace(epochs=4))
    assert any("epochs" in note for note in notes)
