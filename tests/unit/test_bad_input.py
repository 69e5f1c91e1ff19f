"""Bad input gets one clear error line naming the problem and the fix, before anything expensive
(issue 8, items 2 and 5): non-finite numbers in the settings, the CLI and the node; non-finite
LoRA tensors are never written; prompt files that are not prompt text; --out that cannot be a
run folder; a --device that is not there; a damaged model_index.json. CLI errors exit with 2."""
import json
import math

import pytest
import torch

from comfyui_prdp import cli
from comfyui_prdp.models import loading as model_loading
from comfyui_prdp.config import preset
from comfyui_prdp.lora.files import load_lora, save_lora
from comfyui_prdp.models.loading import ModelLoadError, check_diffusers_dir

FLOAT_SETTINGS = ("learning_rate", "cfg", "eta", "weight_decay", "beta", "clip_range", "grad_clip", "adam_eps",
                  "adv_clip", "timestep_fraction", "lora_alpha")
CLI_FLOAT_FLAGS = ("--learning-rate", "--cfg", "--eta", "--weight-decay", "--beta", "--clip-range", "--grad-clip",
                   "--lora-alpha", "--timestep-fraction")


# --- item 2: non-finite numbers ----------------------------------------------------------------
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("name", FLOAT_SETTINGS)
def test_every_float_setting_must_be_finite(name, value):
    with pytest.raises(ValueError, match=f"{name}=(-?inf|nan): must be a finite number"):
        preset("cpu-smoke", **{name: value})


@pytest.mark.parametrize("change, fragment", [
    ({"lora_alpha": 0.0}, "lora_alpha=0.0: must be > 0"),
    ({"lora_alpha": -1.0}, "lora_alpha=-1.0: must be > 0"),
    ({"adam_betas": (0.9, math.inf)}, "adam_betas[1]=inf"),
    ({"adam_betas": (0.9, 1.0)}, "adam_betas=(0.9, 1.0)"),
    ({"adam_eps": 0.0}, "adam_eps=0.0"),
    ({"epochs": "abc"}, "epochs='abc': must be a whole number"),
    ({"seed": -1}, "seed=-1"),
])
def test_other_settings_are_checked_in_range_and_kind(change, fragment):
    with pytest.raises(ValueError) as error:
        preset("cpu-smoke", **change)
    assert fragment in str(error.value)


def test_finite_settings_in_range_still_pass():
    config = preset("cpu-smoke", learning_rate=1e-3, lora_alpha=2.0, cfg=1, eta=1.0, adam_betas=[0.8, 0.99])
    assert config.effective_lora_alpha == 2.0


def cli_run(argv, capsys):
    """(exit code, stderr) of the CLI; a SystemExit (argparse) counts as its code."""
    try:
        code = cli.main(["train", *argv])
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the CLI gets as far as loading a model."""
    loads = []
    monkeypatch.setattr(model_loading, "load_backend", lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    return loads


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "Infinity"])
@pytest.mark.parametrize("flag", CLI_FLOAT_FLAGS)
def test_cli_refuses_non_finite_numbers(flag, value, tmp_path, capsys, no_model_load):
    out = tmp_path / "run"
    code, err = cli_run(["--out", str(out), f"{flag}={value}"], capsys)   # "=": -inf is no option
    assert code == 2 and "not a finite number" in err and flag in err, err
    assert "Traceback" not in err and not out.exists()


def test_node_refuses_json_infinity_and_nan():
    """ComfyUI parses the prompt with Python's json, which reads Infinity and NaN."""
    from comfy_inprocess import load_plugin_package

    train = load_plugin_package().NODE_CLASS_MAPPINGS["PRDPTrainLoRA"]
    values = json.loads('{"learning_rate": Infinity, "beta": NaN, "clip_range": -Infinity}')
    form = dict(prompts="a cat", negative_prompt="", preset="cpu-smoke", epochs=1, prompts_per_epoch=1,
                images_per_prompt=2, steps=2, cfg=3.0, beta=0.1, clip_range=0.01, updates_per_epoch=1,
                learning_rate=3e-3, lora_rank=2, width=64, height=64, seed=0, lora_name="tiny")
    with pytest.raises(ValueError) as refused:
        train.VALIDATE_INPUTS(**{**form, **values})
    for fragment in ("learning_rate=inf", "beta=nan", "clip_range=-inf"):
        assert fragment in str(refused.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_save_lora_refuses_non_finite_tensors_and_writes_nothing(tmp_path, bad):
    good = {"lora_unet_a.lora_down.weight": torch.ones(2, 4), "lora_unet_a.lora_up.weight": torch.zeros(4, 2)}
    existing = save_lora(tmp_path / "kept.safetensors", good)
    before = existing.read_bytes()
    broken = {**good, "lora_unet_a.lora_up.weight": torch.tensor([[0.0, bad]] * 4)}
    with pytest.raises(ValueError, match="lora_unet_a.lora_up.weight.*(lower the learning rate|last good)"):
        save_lora(tmp_path / "new.safetensors", broken)
    with pytest.raises(ValueError, match="NaN or inf"):
        save_lora(existing, broken, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.safetensors"]   # no new file, no temp file
    assert existing.read_bytes() == before
    assert torch.equal(load_lora(existing)[0]["lora_unet_a.lora_down.weight"], good["lora_unet_a.lora_down.weight"])


# --- item 5: one-line errors instead of tracebacks ------------------------------------------------
def prompt_file(tmp_path, kind):
    path = tmp_path / f"{kind}.txt"
    if kind == "latin1":
        path.write_bytes("a cat\nun caf\xe9\n".encode("latin-1"))
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "nul":
        path.write_bytes(b"a cat\na d\x00og\n")
    elif kind == "long-line":
        path.write_text("a cat\n" + "x" * 20_000_000 + "\n")
    elif kind == "folder":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind, fragment", [
    ("latin1", "is not UTF-8 text"),
    ("binary", "NUL bytes"),
    ("nul", "NUL bytes"),
    ("long-line", "line 2 is 20000000 characters long"),
    ("folder", "is not a regular file"),
])
def test_cli_refuses_prompt_files_that_are_not_prompt_text(kind, fragment, tmp_path, capsys, no_model_load):
    path = prompt_file(tmp_path, kind)
    code, err = cli_run(["--out", str(tmp_path / "run"), "--prompts", str(path)], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
    assert not (tmp_path / "run").exists()


def out_target(tmp_path, kind):
    file = tmp_path / "a_file.txt"
    file.write_text("keep me")
    return {"file": file, "under-file": file / "run", "proc": "/proc/prdp_run", "sys": "/sys/prdp_run",
            "dev": "/dev/null"}[kind]


@pytest.mark.parametrize("kind, fragment", [
    ("file", "is a file, not a folder"),
    ("under-file", "which is a file, not a folder"),
    ("proc", "inside /proc, a system folder"),
    ("sys", "inside /sys, a system folder"),
    ("dev", "inside /dev, a system folder"),
])
def test_cli_refuses_an_out_that_cannot_be_a_run_folder(kind, fragment, tmp_path, capsys, no_model_load):
    code, err = cli_run(["--out", str(out_target(tmp_path, kind))], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: --out") and fragment in err, err
    assert (tmp_path / "a_file.txt").read_text() == "keep me"


@pytest.mark.parametrize("device, fragment", [
    ("bogus", "'bogus' is not a device name"),
    ("cuda", "no CUDA GPU is usable here"),
    ("cuda:1", "no CUDA GPU is usable here"),
])
def test_cli_refuses_a_device_that_is_not_there_before_loading(device, fragment, tmp_path, capsys, monkeypatch,
                                                                no_model_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the same answer on a GPU machine
    code, err = cli_run(["--out", str(tmp_path / "run"), "--device", device], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: --device") and fragment in err, err
    assert not no_model_load and not (tmp_path / "run").exists()


def test_device_check_accepts_what_is_there():
    assert model_loading.check_device(None) is None
    assert model_loading.check_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert model_loading.check_device("cuda:0") == torch.device("cuda:0")
        count = torch.cuda.device_count()
        with pytest.raises(ModelLoadError, match=f"has {count} CUDA GPU"):
            model_loading.check_device(f"cuda:{count}")


@pytest.mark.parametrize("content, fragment", [
    ("null", "holds NoneType"),
    ("3", "holds int"),
    ('"text"', "holds str"),
    ('[1, 2]', "holds list"),
    (json.dumps({"unet": None, "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers",
                 "CLIPTokenizer"], "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]}),
     "the entries unet must each be [library, class]"),
])
def test_a_damaged_model_index_gets_a_clear_error(content, fragment, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(content)
    with pytest.raises(ModelLoadError) as error:
        check_diffusers_dir(model)
    assert fragment in str(error.value) and "damaged" in str(error.value)
    code, err = cli_run(["--out", str(tmp_path / "run"), "--base", str(model), "--no-eval"], capsys)
    assert code == 2 and err.startswith("error: ") and fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()            # refused before --out is touched
