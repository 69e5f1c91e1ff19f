"""ComfyUI imported into the test process (CPU only), a tiny random SD1.5 model, and the
plugin package loaded the way ComfyUI loads a custom node (by path, under another name).

Used by test_comfy_backend.py, test_comfy_sdxl.py, test_comfy_flow.py and test_nodes_validate.py. A test module that needs ComfyUI
calls ``import_comfy()`` at import time: without a usable tree the whole module is skipped
with the reason (a module-level skip, so collection never fails).

One process can import only one ComfyUI (``comfy`` is a global package), so in-process tests
use the first usable tree of ``comfy_harness.find_comfyui_trees()`` (COMFYUI_ROOTS, else
COMFYUI_ROOT, else ~/ComfyUI) and live in tests/comfy/inprocess/, which ``scripts/test.sh``
runs again for every further tree, one pytest process per tree.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import sys
import threading
from pathlib import Path

import pytest

import comfy_harness

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_NAME = "comfyui_prdp_custom_node"     # ComfyUI also imports custom nodes under a made-up name

#: the tiny UNet layout (ComfyUI detects SD15 from model_channels 320 + context_dim 768)
TINY_UNET = dict(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1, 1],
                 channel_mult=[1, 1], num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
                 transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1,
                 context_dim=768, use_linear_in_transformer=False, legacy=False)
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def inprocess_tree() -> comfy_harness.ComfyTree:
    """The tree imported in-process: the first usable one, else the first (with its problem)."""
    trees = comfy_harness.find_comfyui_trees()
    return next((tree for tree in trees if tree.root is not None), trees[0])


def comfyui_root() -> Path | None:
    return inprocess_tree().root


def import_comfy():
    """Import ComfyUI's modules in-process on the CPU and return its root; without a usable
    tree skip the calling test, or the whole module when called at import time."""
    tree = inprocess_tree()
    root = tree.root
    if root is None:
        pytest.skip(f"in-process ComfyUI tests: {tree.problem}", allow_module_level=True)
    if str(root) not in sys.path:
        sys.path.append(str(root))   # appended: ComfyUI's top-level `nodes` must not shadow ours
    try:
        import comfy.options
        comfy.options.enable_args_parsing(False)
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import comfy.model_management  # noqa: F401  (after args.cpu)
        import comfy.sd  # noqa: F401
        import folder_paths  # noqa: F401
    except ImportError as error:
        pytest.skip(f"ComfyUI at {root} cannot be imported here ({error}); run scripts/setup_comfyui.sh",
                    allow_module_level=True)
    return root


class LogCapture(logging.Handler):
    """Every log message while attached (e.g. ComfyUI's 'lora key not loaded' warnings)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def lora_through_comfyui(model, lora: dict):
    """comfy.sd.load_lora_for_models (what core LoraLoader calls) on a LoRA state dict, under
    inference mode as in the server: (the patched MODEL, its 'lora key not loaded' messages)."""
    import torch
    import comfy.sd

    capture = LogCapture()
    logging.getLogger().addHandler(capture)
    try:
        with torch.inference_mode():
            patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
    finally:
        logging.getLogger().removeHandler(capture)
    return patched, [m for m in capture.messages if "lora key not loaded" in m]


def make_backend(family, **kwargs):
    """A ComfyBackend on a tiny family's model, clip and vae (rank 2, seed 0 unless given), built
    under inference mode as the node builds it in ComfyUI's worker thread."""
    import torch
    from comfyui_prdp.backends.comfyui.backend import ComfyBackend

    with torch.inference_mode():
        return ComfyBackend(family.model, family.clip, family.vae, **{"rank": 2, "seed": 0, **kwargs})


def randomize_lora(backend, scale: float = 0.05, seed: int = 1) -> None:
    """Every LoRA factor drawn from N(0, scale^2), so the adapters change the model's output."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in backend.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


def lora_outputs(backend, method: str, *inputs):
    """(with the LoRA, with the adapters disabled): backend.<method>(*inputs) without gradients,
    each in a fresh thread as the job runner calls the backend."""
    import torch

    predict = getattr(backend, method)
    with torch.no_grad():
        trained = in_thread(lambda: predict(*inputs).detach())
        with backend.adapters_disabled():
            base = in_thread(lambda: predict(*inputs).detach())
    return trained, base


def output_through_loader(family, patched, method: str, *inputs, **backend_options):
    """backend.<method>(*inputs) of a fresh backend on a MODEL patched by ComfyUI's LoRA loader,
    its own (zero) adapters disabled: what the loaded file alone makes of the model."""
    loaded = make_backend(type(family)(patched, family.clip, family.vae, family.name), **backend_options)
    try:
        return lora_outputs(loaded, method, *inputs)[1]
    finally:
        loaded.release()


def in_thread(function):
    """function() in a fresh thread (as the job runner calls the backend: no inference mode,
    no thread-local state of the test's thread); its result, or its exception raised here."""
    box = {}

    def body():
        try:
            box["value"] = function()
        except BaseException as error:  # noqa: BLE001  (raised again in the caller's thread)
            box["error"] = error

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _reset_parameters(module):
    import torch

    for sub in module.modules():
        for cls in type(sub).__mro__:
            if cls.__module__.startswith("torch.nn") and "reset_parameters" in cls.__dict__:
                cls.reset_parameters(sub)
                break
    for name, value in module.state_dict().items():
        assert torch.isfinite(value).all(), f"{name} is not finite after initialisation"
    return module


def tiny_sd15_state_dict(seed: int = 0) -> dict:
    """A checkpoint state dict (ldm key names) with random weights; ComfyUI detects SD15."""
    import torch
    import comfy.clip_model
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    root = comfyui_root()
    torch.manual_seed(seed)
    ops = comfy.ops.disable_weight_init
    unet = _reset_parameters(UNetModel(**TINY_UNET, operations=ops))
    clip_config = json.loads((root / "comfy" / "sd1_clip_config.json").read_text())
    clip = _reset_parameters(comfy.clip_model.CLIPTextModel(clip_config, torch.float32, "cpu", ops))
    vae = _reset_parameters(AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4))
    state = {}
    for prefix, module in (("model.diffusion_model.", unet), ("cond_stage_model.transformer.", clip),
                           ("first_stage_model.", vae)):
        state.update({prefix + k: v for k, v in module.state_dict().items()})
    return state


def load_tiny_sd15(seed: int = 0):
    """(MODEL, CLIP, VAE) loaded through ComfyUI's checkpoint loader under inference mode, as
    CheckpointLoaderSimple does inside the server."""
    import torch
    import comfy.sd

    state = tiny_sd15_state_dict(seed)
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(state, output_vae=True, output_clip=True)
    assert type(model.model.model_config).__name__ == "SD15", "ComfyUI did not detect the tiny model as SD15"
    assert clip is not None and vae is not None
    return model, clip, vae


def load_plugin_package():
    """The repository imported as ComfyUI imports a custom node package."""
    if PACKAGE_NAME in sys.modules:
        return sys.modules[PACKAGE_NAME]
    spec = importlib.util.spec_from_file_location(PACKAGE_NAME, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACKAGE_NAME]
        raise
    return module


@pytest.fixture()
def comfy_dirs(tmp_path):
    """ComfyUI's output/input/loras folders redirected to a temporary folder."""
    import folder_paths

    saved = (folder_paths.get_output_directory(), folder_paths.get_input_directory(),
             folder_paths.folder_names_and_paths["loras"])
    folder_paths.set_output_directory(str(tmp_path / "output"))
    folder_paths.set_input_directory(str(tmp_path / "input"))
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path / "loras")], saved[2][1])
    yield tmp_path
    folder_paths.set_output_directory(saved[0])
    folder_paths.set_input_directory(saved[1])
    folder_paths.folder_names_and_paths["loras"] = saved[2]
