"""Finding weight files, the errors for missing/corrupt ones, ComfyUI folders, preprocessing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import reward_fixtures as F
from comfyui_prdp.rewards import RewardModelFileError, RewardModelNotFoundError, create_reward
from comfyui_prdp.rewards.aesthetic import AESTHETIC_MLP, OPENAI_CLIP_L14
from comfyui_prdp.rewards.clip_preprocess import clip_preprocess, resized_size
from comfyui_prdp.rewards.hps import HPS_FILES
from comfyui_prdp.rewards.model_files import (
    COMFY_FOLDER_NAME, ENV_MODEL_DIRS, register_comfy_folder, resolve_model_path,
)
from comfyui_prdp.rewards.pickscore import PICKSCORE

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """Point huggingface_hub at an empty cache and make sure nothing reaches the network."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv(ENV_MODEL_DIRS, raising=False)
    calls = []

    def no_network(*args, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        if not local_files_only:
            raise ConnectionError("network is unreachable (test)")
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached (test)")

    real_download = huggingface_hub.hf_hub_download
    real_snapshot = huggingface_hub.snapshot_download

    def guarded_file(repo_id, filename, *, local_files_only=False, **kwargs):
        if local_files_only:
            return real_download(repo_id, filename, local_files_only=True, **kwargs)
        return no_network(local_files_only=False)

    def guarded_snapshot(repo_id, *, local_files_only=False, **kwargs):
        if local_files_only:
            return real_snapshot(repo_id, local_files_only=True, **kwargs)
        return no_network(local_files_only=False)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", guarded_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", guarded_snapshot)
    return types.SimpleNamespace(path=cache, network_calls=calls)


def _fake_hf_cache_entry(cache: Path, repo: str, files: dict) -> Path:
    """Lay out models--org--name/{refs/main, snapshots/<sha>/...} as huggingface_hub does."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    snapshot = root / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        target = snapshot / name
        if Path(source).is_dir():
            import shutil

            shutil.copytree(source, target)
        else:
            target.write_bytes(Path(source).read_bytes())
    return snapshot


# --- preprocessing -----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(100, 80), (512, 384), (224, 224), (225, 500), (64, 64)])
def test_clip_preprocess_matches_torchvision_on_pil(size):
    from torchvision import transforms

    reference = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    images = F.quantised(F.make_images(2, size=size, seed=5))
    ours = clip_preprocess(images)
    expected = torch.stack([reference(F.to_pil(image)) for image in images])
    assert ours.shape == expected.shape == (2, 3, 224, 224)
    pixel_error = (ours - expected).abs() * 0.2686 * 255  # back to 0..255 levels
    assert pixel_error.mean() < 0.6
    assert pixel_error.max() < 6.0
    if size == (224, 224):
        assert pixel_error.max() < 1e-3


@pytest.mark.parametrize("size", [(100, 80), (80, 100), (225, 500), (333, 224), (224, 224)])
def test_resized_size_matches_torchvision(size):
    from torchvision.transforms import functional as TF

    resized = TF.resize(torch.zeros(1, *size), 224)
    assert resized.shape[-2:] == resized_size(*size, 224)


# --- missing files -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected_file,repo", [
    ("aesthetic", "sac+logos+ava1-l14-linearMSE.pth", "camenduru/improved-aesthetic-predictor"),
    ("pickscore", "PickScore_v1", "yuvalkirstain/PickScore_v1"),
    ("hpsv2", "HPS_v2_compressed.pt", "xswu/HPSv2"),
    ("hpsv2.1", "HPS_v2.1_compressed.pt", "xswu/HPSv2"),
    ("clipscore", "clip-vit-large-patch14", "openai/clip-vit-large-patch14"),
])
def test_missing_model_error_names_files_and_folders(tmp_path, empty_hf_cache, name, expected_file, repo):
    folder = tmp_path / "reward_models"
    folder.mkdir()
    with pytest.raises(RewardModelNotFoundError) as error:
        create_reward(name, model_dir=folder, allow_download=False)
    message = str(error.value)
    assert expected_file in message and str(folder) in message
    assert f"https://huggingface.co/{repo}" in message
    assert "not in the Hugging Face cache" in message and "downloading is off" in message
    assert empty_hf_cache.network_calls == []
    if name in ("pickscore", "clipscore"):
        assert "config.json" in message and "model.safetensors" in message


def test_missing_model_error_reports_the_failed_download(tmp_path, empty_hf_cache):
    with pytest.raises(RewardModelNotFoundError) as error:
        resolve_model_path(HPS_FILES["hpsv2"], model_dir=tmp_path, allow_download=True)
    assert "download failed (ConnectionError" in str(error.value)
    assert False in empty_hf_cache.network_calls  # it did try, once allowed


def test_downloads_follow_hf_hub_offline(tmp_path, empty_hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RewardModelNotFoundError, match="downloading is off"):
        resolve_model_path(HPS_FILES["hpsv2"], model_dir=tmp_path)
    assert False not in empty_hf_cache.network_calls


def test_explicit_path_that_does_not_exist(tmp_path, empty_hf_cache):
    missing = tmp_path / "nope" / "HPS_v2_compressed.pt"
    with pytest.raises(RewardModelNotFoundError, match="does not exist") as error:
        create_reward("hpsv2", path=missing)
    assert str(missing) in str(error.value)


def test_wrong_kind_of_path(tmp_path, empty_hf_cache):
    with pytest.raises(RewardModelNotFoundError, match="is a folder"):
        create_reward("hpsv2", path=tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(RewardModelNotFoundError, match="is not a folder"):
        create_reward("pickscore", path=tmp_path / "weights.bin")
    # a file inside a model folder (what ComfyUI's file list offers) means that folder
    inside = F.reward_model_dir() / "PickScore_v1" / "model.safetensors"
    assert resolve_model_path(PICKSCORE, inside) == inside.parent
    empty = tmp_path / "PickScore_v1"
    empty.mkdir()
    with pytest.raises(RewardModelNotFoundError, match="lacks config.json"):
        create_reward("pickscore", path=empty)


# --- where files are found ---------------------------------------------------------------------

def test_search_order_and_bare_names(tmp_path, empty_hf_cache, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    in_second = F.copy_of("HPS_v2_compressed.pt", second)
    assert resolve_model_path(HPS_FILES["hpsv2"], model_dir=[first, second]) == in_second.resolve()
    in_first = F.copy_of("HPS_v2_compressed.pt", first)
    assert resolve_model_path(HPS_FILES["hpsv2"], model_dir=[first, second]) == in_first.resolve()
    # a bare file name is looked up in the folders (what a ComfyUI dropdown passes)
    renamed = second / "my-hps.pt"
    renamed.write_bytes(in_second.read_bytes())
    assert resolve_model_path(HPS_FILES["hpsv2"], "my-hps.pt", model_dir=[first, second]) == renamed.resolve()
    # the environment variable adds folders
    monkeypatch.setenv(ENV_MODEL_DIRS, str(second))
    assert resolve_model_path(HPS_FILES["hpsv2"], "my-hps.pt") == renamed.resolve()


def test_hugging_face_cache_is_used_without_network(tmp_path, empty_hf_cache):
    _fake_hf_cache_entry(empty_hf_cache.path, "xswu/HPSv2",
                         {"HPS_v2_compressed.pt": F.reward_model_dir() / "HPS_v2_compressed.pt"})
    found = resolve_model_path(HPS_FILES["hpsv2"], model_dir=tmp_path, allow_download=False)
    assert found.name == "HPS_v2_compressed.pt" and "models--xswu--HPSv2" in str(found)
    snapshot = _fake_hf_cache_entry(empty_hf_cache.path, "someone/my-pickscore",
                                    {name: F.reward_model_dir() / "PickScore_v1" / name
                                     for name in os.listdir(F.reward_model_dir() / "PickScore_v1")})
    # a repo id given as path= is resolved through the cache too
    assert resolve_model_path(PICKSCORE, "someone/my-pickscore", allow_download=False) == snapshot.resolve()
    reward = create_reward("pickscore", path="someone/my-pickscore", allow_download=False)
    assert reward.score(F.make_images(1), F.PROMPTS[:1]).shape == (1,)
    assert empty_hf_cache.network_calls == []


def test_incomplete_cached_snapshot_is_not_used(tmp_path, empty_hf_cache):
    _fake_hf_cache_entry(empty_hf_cache.path, "yuvalkirstain/PickScore_v1",
                         {"config.json": F.reward_model_dir() / "PickScore_v1" / "config.json"})
    with pytest.raises(RewardModelNotFoundError, match="incomplete"):
        resolve_model_path(PICKSCORE, model_dir=tmp_path, allow_download=False)


class _FakeFolderPaths(types.ModuleType):
    """The part of ComfyUI's folder_paths API used here, with the same semantics."""

    def __init__(self, models_dir):
        super().__init__("folder_paths")
        self.models_dir = str(models_dir)
        self.folder_names_and_paths = {}

    def add_model_folder_path(self, name, path, is_default=False):
        paths = self.folder_names_and_paths.setdefault(name, ([], set()))[0]
        if path not in paths:
            paths.insert(0, path) if is_default else paths.append(path)

    def get_folder_paths(self, name):
        return list(self.folder_names_and_paths[name][0])


def test_comfy_folder_registration_and_lookup(tmp_path, empty_hf_cache, monkeypatch):
    fake = _FakeFolderPaths(tmp_path / "models")
    extra = tmp_path / "extra_models"  # as if from extra_model_paths.yaml
    extra.mkdir()
    fake.add_model_folder_path(COMFY_FOLDER_NAME, str(extra))
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    assert register_comfy_folder()
    assert register_comfy_folder()  # idempotent
    default = str(tmp_path / "models" / COMFY_FOLDER_NAME)
    assert fake.get_folder_paths(COMFY_FOLDER_NAME) == [default, str(extra)]
    placed = F.copy_of("sac+logos+ava1-l14-linearMSE.pth", extra)
    assert resolve_model_path(AESTHETIC_MLP, allow_download=False) == placed.resolve()
    with pytest.raises(RewardModelNotFoundError) as error:
        resolve_model_path(OPENAI_CLIP_L14, allow_download=False)
    assert default in str(error.value) and str(extra) in str(error.value)


def test_register_without_comfyui_is_a_no_op(monkeypatch):
    monkeypatch.setitem(sys.modules, "folder_paths", None)  # makes `import folder_paths` fail
    assert register_comfy_folder() is False


# --- corrupt and wrong files -------------------------------------------------------------------

def test_truncated_checkpoint(tmp_path, empty_hf_cache):
    broken = tmp_path / "HPS_v2_compressed.pt"
    broken.write_bytes((F.reward_model_dir() / "HPS_v2_compressed.pt").read_bytes()[:5000])
    with pytest.raises(RewardModelFileError) as error:
        create_reward("hpsv2", model_dir=tmp_path, arch=F.TINY_OPEN_CLIP)
    message = str(error.value)
    assert str(broken) in message and "hpsv2 checkpoint" in message
    assert "corrupt" in message
    assert len(message) < 1000  # a sentence, not a dump


def test_garbage_aesthetic_file(tmp_path, empty_hf_cache):
    F.copy_of("clip-vit-large-patch14", tmp_path)
    (tmp_path / "sac+logos+ava1-l14-linearMSE.pth").write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(RewardModelFileError) as error:
        create_reward("aesthetic", model_dir=tmp_path)
    assert "sac+logos+ava1-l14-linearMSE.pth" in str(error.value)
    assert "LAION aesthetic MLP" in str(error.value)


def test_wrong_model_in_the_right_place(tmp_path, empty_hf_cache):
    # the aesthetic head saved under the HPS name: readable, but not an open_clip model
    (tmp_path / "HPS_v2_compressed.pt").write_bytes(
        (F.reward_model_dir() / "sac+logos+ava1-l14-linearMSE.pth").read_bytes())
    with pytest.raises(RewardModelFileError, match="weights are missing") as error:
        create_reward("hpsv2", model_dir=tmp_path, arch=F.TINY_OPEN_CLIP)
    assert "layers.0" in str(error.value)  # it says what it found
    # an HPS checkpoint under the aesthetic name
    F.copy_of("clip-vit-large-patch14", tmp_path)
    (tmp_path / "sac+logos+ava1-l14-linearMSE.pth").write_bytes(
        (F.reward_model_dir() / "HPS_v2_compressed.pt").read_bytes())
    with pytest.raises(RewardModelFileError, match="layers.0.weight"):
        create_reward("aesthetic", model_dir=tmp_path)


def test_checkpoint_for_another_architecture(tmp_path, empty_hf_cache):
    import open_clip

    wide = "prdp-tiny-open-clip-wide"
    config = json.loads(json.dumps(F.TINY_OPEN_CLIP_CONFIG))
    config["text_cfg"]["width"] = 96
    (tmp_path / f"{wide}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{wide}.json")
    with pytest.raises(RewardModelFileError, match="other shapes") as error:
        create_reward("hpsv2", path=F.reward_model_dir() / "HPS_v2_compressed.pt", arch=wide)
    assert "right model (or architecture)" in str(error.value)
    with pytest.raises(ValueError, match="no architecture 'ViT-Nope'"):
        create_reward("hpsv2", path=F.reward_model_dir() / "HPS_v2_compressed.pt", arch="ViT-Nope")


def test_corrupt_transformers_folder(tmp_path, empty_hf_cache):
    folder = F.copy_of("PickScore_v1", tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(RewardModelFileError) as error:
        create_reward("pickscore", model_dir=tmp_path)
    assert str(folder) in str(error.value) and "corrupt" in str(error.value)


def test_transformers_folder_of_another_model(tmp_path, empty_hf_cache):
    folder = F.copy_of("PickScore_v1", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RewardModelFileError, match="describes a 'bert' model"):
        create_reward("pickscore", model_dir=tmp_path)


def test_projection_width_mismatch_is_explained(tmp_path, empty_hf_cache):
    F.copy_of("sac+logos+ava1-l14-linearMSE.pth", tmp_path)
    F.tiny_transformers_clip(seed=7, projection_dim=32).save_pretrained(tmp_path / "clip-vit-large-patch14")
    with pytest.raises(ValueError, match="expects 768-d CLIP embeddings"):
        create_reward("aesthetic", model_dir=tmp_path)


def test_module_prefix_is_stripped(tmp_path, empty_hf_cache):
    state = torch.load(F.reward_model_dir() / "HPS_v2_compressed.pt")["state_dict"]
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "HPS_v2_compressed.pt")
    images = F.make_images(2, size=(224, 224))
    wrapped = create_reward("hpsv2", model_dir=tmp_path, arch=F.TINY_OPEN_CLIP).score(images, F.PROMPTS[:2])
    plain = create_reward("hpsv2", model_dir=F.reward_model_dir(), arch=F.TINY_OPEN_CLIP).score(images, F.PROMPTS[:2])
    torch.testing.assert_close(wrapped, plain)


def test_import_is_light():
    """`import comfyui_prdp.rewards` must not import open_clip or transformers."""
    code = ("import sys; import comfyui_prdp.rewards; "
            "print([m for m in ('open_clip', 'transformers', 'huggingface_hub') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
