"""The ComfyUI nodes on a simulated GPU: every move copies (tests/support/simulated_gpu.py), as ComfyUI's
model loading does on a GPU. On a CPU these moves are no-ops, which hid that the job thread's
text encoding and VAE decoding (ComfyUI moves the CLIP and VAE it loaded under inference mode)
and a reward built by Load Reward Model crashed at epoch 1 with "Inference tensors ...".
"""
from __future__ import annotations

import pytest
import torch

from comfy_inprocess import comfy_dirs, import_comfy, load_tiny_sd15  # noqa: F401  (comfy_dirs: a fixture)

import_comfy()

import folder_paths  # noqa: E402

import reward_fixtures as F  # noqa: E402
from comfyui_prdp.models.inference_tensors import inference_like_tensors, is_inference_like  # noqa: E402
from comfyui_prdp.rewards.loading import clear_model_cache  # noqa: E402
from simulated_gpu import copying_moves  # noqa: E402

from test_comfy_backend import TINY_TRAINING  # noqa: E402

TINY = {**TINY_TRAINING, "epochs": 2}


@pytest.fixture(scope="module")
def plugin():
    from comfy_inprocess import load_plugin_package

    return load_plugin_package()


@pytest.fixture(scope="module")
def reward_folder():
    folder = str(F.reward_model_dir())
    folder_paths.add_model_folder_path("reward_models", folder)
    yield folder
    paths = folder_paths.folder_names_and_paths["reward_models"][0]
    if folder in paths:
        paths.remove(folder)


def load_reward(plugin, name):
    """Load Reward Model (PRDP) as ComfyUI runs it: under inference mode, fresh (no cache)."""
    clear_model_cache()
    with torch.inference_mode():
        return plugin.NODE_CLASS_MAPPINGS["PRDPLoadRewardModel"]().load(name, "(auto)", "auto", "auto",
                                                                       allow_download=False)[0]


def test_load_reward_model_builds_ordinary_tensors_under_inference_mode(plugin, reward_folder):
    for name in ("aesthetic", "imagereward"):     # (HPS needs the tiny open_clip arch the node does not take)
        reward = load_reward(plugin, name)
        bad = [n for module in reward.modules() for n in inference_like_tensors(module)]
        assert not bad, f"{name}: {len(bad)} inference tensors, e.g. {bad[0]}"


def damaged(module):
    """Parameters that lost their version counter (inference data in a Parameter moved outside
    inference mode): they fail at the next forward outside inference mode."""
    return [name for name, tensor in module.named_parameters() if not tensor.is_inference() and is_inference_like(tensor)]


@pytest.mark.parametrize("prompt_count", [2, 70], ids=["prompts-encoded-in-the-node", "prompts-encoded-in-the-job"])
def test_training_with_a_neural_reward_runs_two_epochs_when_moves_copy(plugin, reward_folder, comfy_dirs,
                                                                        prompt_count):
    with torch.inference_mode():
        model, clip, vae = load_tiny_sd15(seed=5)
    reward = load_reward(plugin, "aesthetic")
    prompts = "\n".join(f"a cat number {i}" for i in range(prompt_count))   # > 64: encoded lazily in the job
    with copying_moves(), torch.inference_mode():         # ComfyUI's worker thread runs nodes so
        out = plugin.NODE_CLASS_MAPPINGS["PRDPTrainLoRA"]().train(model, clip, vae, reward, lora_name="gpu_path",
                                                                 unique_id="11", **{**TINY, "prompts": prompts})
    for name, module in (("CLIP", clip.cond_stage_model), ("VAE", vae.first_stage_model)):
        assert not damaged(module), f"the user's {name} was left with {len(damaged(module))} damaged parameters"
    text = out["ui"]["text"][0]
    assert "finished: 2 of 2 epochs" in text, text
    assert (comfy_dirs / "loras" / "prdp" / "gpu_path.safetensors").is_file()
    lines = (comfy_dirs / "output" / "prdp_runs" / "gpu_path" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2


def tiny_backend(seed, **options):
    """A ComfyBackend on a fresh tiny SD1.5, built as the node builds it."""
    from comfyui_prdp.backends.comfyui.backend import ComfyBackend

    with torch.inference_mode():
        model, clip, vae = load_tiny_sd15(seed=seed)
    with torch.inference_mode(False):
        return ComfyBackend(model, clip, vae, rank=2, seed=0, **options)


def test_the_training_reserve_grows_to_the_measured_update_peak(monkeypatch):
    """On CUDA the update phase's peak is measured and reserved (with headroom) for the next
    training load; a simulated CUDA memory counter stands in for the GPU."""
    import comfy.model_management

    backend = tiny_backend(seed=6)
    allocated = {"now": 1000, "peak": 1000}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: allocated.update(peak=allocated["now"]))
    reserved = []
    real_load = comfy.model_management.load_models_gpu
    monkeypatch.setattr(comfy.model_management, "load_models_gpu",
                        lambda models, memory_required=0, **kw: (reserved.append(memory_required),
                                                                 real_load(models, memory_required=0, **kw))[1])
    backend.device = torch.device("cuda")          # the accounting only; the model stays on the CPU
    estimate = backend.patcher.memory_required([2, 4, 8, 8])
    try:
        backend.prepare_for_training()
        with torch.enable_grad():
            backend._load((2, 4, 8, 8))
        assert reserved[-1] == int(3 * estimate)   # nothing measured yet: the factor of the estimate
        allocated["peak"] = 1000 + 40 * estimate   # the update phase peaked far above the estimate
        backend.prepare_for_sampling()
        backend.prepare_for_training()
        with torch.enable_grad():
            backend._load((2, 4, 8, 8))
        assert reserved[-1] == int(1.25 * 40 * estimate)
        with torch.no_grad():
            backend._load((2, 4, 8, 8))
        assert reserved[-1] == estimate            # sampling reserves the inference estimate only
    finally:
        backend.device = torch.device("cpu")
        backend.release()


def test_before_the_reward_phase_comfyui_frees_room_for_the_reward_model(monkeypatch):
    import comfy.model_management

    backend = tiny_backend(seed=7)
    freed = []
    monkeypatch.setattr(comfy.model_management, "free_memory",
                        lambda memory_required, device, *args, **kwargs: freed.append((memory_required, device.type)))
    try:
        backend.prepare_for_scoring(2 * 2 ** 30)
        assert freed == []                          # a CPU holds no GPU memory to free
        backend.device = torch.device("cuda")       # the accounting only
        backend.prepare_for_scoring(2 * 2 ** 30)
        backend.prepare_for_scoring(0)              # JPEG, a reward server: nothing to make room for
        assert freed == [(3 * 2 ** 30, "cuda")]
    finally:
        backend.device = torch.device("cpu")
        backend.release()


def test_the_backend_reports_the_dtype_comfyui_computes_in(monkeypatch):
    """float16 (pre-Ampere GPUs) turns on the trainer's loss scaling."""
    import comfyui_prdp.backends.comfyui.backend as comfy_backend
    from comfyui_prdp.training.update import computes_in_float16

    backend = tiny_backend(seed=8)
    try:
        base = backend.patcher.model
        assert backend.compute_dtype == (base.manual_cast_dtype or base.get_dtype())
        assert not computes_in_float16(backend)
    finally:
        backend.release()
    monkeypatch.setattr(comfy_backend, "training_compute_dtype", lambda *args: torch.float16)
    monkeypatch.setattr(type(backend.patcher), "set_model_compute_dtype", lambda self, dtype: None)
    pre_ampere = tiny_backend(seed=8, mixed_precision="fp16")
    try:
        assert pre_ampere.compute_dtype == torch.float16 and computes_in_float16(pre_ampere)
    finally:
        pre_ampere.release()
