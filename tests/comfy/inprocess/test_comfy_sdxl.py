"""ComfyBackend on tiny SDXL, SDXL v-prediction (zero-terminal-SNR) and SD2.x v-prediction
models built through ComfyUI's own classes (tests/support/comfy_tiny_families.py), in-process on the CPU.

What each test pins down:
- SDXL's pooled text embedding and size conditioning reach the UNet, and the size used is
  the training image size (the latent's size x 8), as ComfyUI's samplers pass it;
- predict_eps of v-prediction models equals the eps ComfyUI's own model_sampling implies
  (calculate_input / calculate_denoised), also at zero-terminal-SNR's huge last sigma;
- the trainer's own on-policy check (sampling batch layout vs update micro-batches) < 1e-5;
- a short run changes the LoRA and the exported file loads through ComfyUI's LoRA loader
  (comfy.sd.load_lora_for_models, what core LoraLoader calls) with zero keys not loaded and
  the trained adapters' output.
"""
import sys

import pytest
import torch

from comfy_inprocess import (import_comfy, in_thread, lora_outputs, lora_through_comfyui, make_backend,
                             output_through_loader)

import_comfy()

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

from comfy_tiny_families import tiny_family  # noqa: E402
from comfyui_prdp.config import TrainConfig  # noqa: E402
from comfyui_prdp.lora.files import load_lora, save_lora  # noqa: E402
from comfyui_prdp.trainer import Trainer  # noqa: E402
from toy_backend import BrightnessReward  # noqa: E402

FAMILIES = ("sdxl", "sdxl-v", "sd2-v")


def raw_unet(patcher, x_in, t, context, y=None):
    """The UNet's own output (eps or v) for model input x_in at integer timesteps t."""
    comfy.model_management.load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.diffusion_model(x_in, t.float(), context=context, y=y).float()


def sdxl_adm(model, pooled, width, height):
    """SDXL's vector conditioning (pooled text + size embeddings) by ComfyUI's own encode_adm."""
    return model.model.encode_adm(pooled_output=pooled, width=width, height=height).float()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return tiny_family(request.param)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_family("sdxl")


def test_the_tiny_models_are_what_comfyui_makes_of_each_family(family):
    config = type(family.model.model.model_config).__name__
    model_type = family.model.model.model_type.name
    sampling = family.model.get_model_object("model_sampling")
    assert (config, model_type) == {"sdxl": ("SDXL", "EPS"), "sdxl-v": ("SDXL", "V_PREDICTION"),
                                    "sd2-v": ("SD20", "V_PREDICTION")}[family.name]
    backend = make_backend(family)
    try:
        sigmas = sampling.sigmas.double()
        assert torch.allclose(backend.alphas_cumprod, 1 / (1 + sigmas ** 2), rtol=1e-6, atol=0)
        if family.name == "sdxl-v":     # zero-terminal SNR: the last alpha_bar is ~0 (rescaled schedule)
            assert backend.alphas_cumprod[-1] < 1e-7 and float(sampling.sigmas[-1]) > 1000
        else:
            betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
            assert torch.allclose(backend.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-5)
        assert tuple(backend.latent_shape(64, 128)) == (4, 8, 16)
    finally:
        backend.release()


def test_sdxl_pooled_output_and_training_size_reach_the_unet(sdxl):
    backend = make_backend(sdxl)
    try:
        cond = in_thread(lambda: backend.encode_prompts(["a cat", "a dog"]))
        assert cond["context"].shape == (2, 77, 64) and cond["pooled_output"].shape == (2, 32)
        t = torch.tensor([600, 300])
        for height, width in ((64, 64), (64, 128)):        # the training size is the latent's x 8
            x = torch.randn(2, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(height + width))
            eps = in_thread(lambda: backend.predict_eps(x, t, cond).detach())
            # eps model, LoRA at zero: the UNet's output at the VP latent, y = pooled + this size
            expected = raw_unet(sdxl.model, x, t, cond["context"],
                                sdxl_adm(sdxl.model, cond["pooled_output"], width, height))
            assert torch.allclose(eps, expected, atol=2e-4), (eps - expected).abs().max()
            other_size = raw_unet(sdxl.model, x, t, cond["context"],
                                  sdxl_adm(sdxl.model, cond["pooled_output"], 2 * width, 2 * height))
            assert (other_size - eps).abs().max() > 1e-3, "the size conditioning has no effect"
        changed = dict(cond, pooled_output=cond["pooled_output"] + 1.0)
        eps_changed = in_thread(lambda: backend.predict_eps(x, t, changed).detach())
        assert (eps_changed - eps).abs().max() > 1e-3, "the pooled output does not reach the UNet"
        assert torch.allclose(eps_changed, raw_unet(sdxl.model, x, t, cond["context"],
                              sdxl_adm(sdxl.model, changed["pooled_output"], width, height)), atol=2e-4)
    finally:
        backend.release()


@pytest.mark.parametrize("kind", ["sdxl-v", "sd2-v"])
def test_predict_eps_of_v_prediction_models_follows_comfyuis_model_sampling(kind):
    family = tiny_family(kind)
    sampling = family.model.get_model_object("model_sampling")
    backend = make_backend(family)
    try:
        cond = in_thread(lambda: backend.encode_prompts(["a cat", "a dog", "a fox"]))
        x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(7))
        t = torch.tensor([999, 500, 20])
        eps = in_thread(lambda: backend.predict_eps(x, t, cond).detach())

        sigma = sampling.sigmas[t].float()
        x_sigma = x * (1 + sigma ** 2).sqrt().view(-1, 1, 1, 1)     # ComfyUI's latent at sigma
        x_in = sampling.calculate_input(sigma, x_sigma)
        assert torch.equal(sampling.timestep(sigma).round().long(), t)
        y = sdxl_adm(family.model, cond["pooled_output"], 64, 64) if kind.startswith("sdxl") else None
        v = raw_unet(family.model, x_in, t, cond["context"], y)
        x0 = sampling.calculate_denoised(sigma, v, x_sigma)
        expected = (x_sigma - x0) / sigma.view(-1, 1, 1, 1)
        assert torch.allclose(eps, expected, rtol=1e-4, atol=5e-4), (eps - expected).abs().max()
        a = backend.alphas_cumprod[t].view(-1, 1, 1, 1)             # the same in VP form, float64
        vp = ((1 - a).sqrt() * x.double() + a.sqrt() * v.double()).float()
        assert torch.allclose(eps, vp, rtol=1e-4, atol=5e-4), (eps - vp).abs().max()
        assert (eps - v).abs().max() > 1e-2    # a v model's raw output is not its eps
    finally:
        backend.release()


#: sampling batches of 4 trajectories, update micro-batches of 3 transitions: other layouts
TINY_RUN = dict(epochs=2, prompts_per_epoch=2, images_per_prompt=2, updates_per_epoch=2, steps=3, cfg=3.0,
                beta=0.05, clip_range=0.05, learning_rate=0.02, lora_rank=2, width=64, height=64,
                sample_batch_size=4, train_batch_size=3, seed=5)


def test_a_short_run_trains_on_policy_and_its_lora_loads_in_comfyui(family, tmp_path):
    backend = make_backend(family)
    try:
        before = [p.detach().clone() for p in backend.trainable_parameters()]
        trainer = Trainer(backend, BrightnessReward(), ["a cat", "a dog", "a fox"], TrainConfig(**TINY_RUN),
                          out_dir=tmp_path / "run")
        result = in_thread(trainer.run)
        assert result.epochs_done == 2 and not result.stopped
        for metrics in result.metrics:
            # first update of each epoch: the recomputed log-probs equal the recorded ones
            assert metrics["onpolicy_max_diff"] < 1e-5, metrics["onpolicy_max_diff"]
            assert all(torch.isfinite(torch.tensor(float(metrics[k]))) for k in ("loss", "grad_norm"))
        moved = max((p.detach() - b).abs().max().item() for p, b in zip(backend.trainable_parameters(), before))
        assert moved > 1e-4, "the LoRA did not change"

        state, metadata = load_lora(result.lora_path)
        assert len(state) == 3 * len(backend.adapters) and all(k.startswith("lora_unet_") for k in state)
        version, v_param = {"sdxl": ("sdxl_base_v1-0", "False"), "sdxl-v": ("sdxl_base_v1-0", "True"),
                            "sd2-v": ("sd_v2_768_v", "True")}[family.name]
        assert (metadata["ss_base_model_version"], metadata["ss_v_parameterization"]) == (version, v_param)
        assert metadata["ss_v2"] == str(family.name == "sd2-v") and metadata["ss_resolution"] == "(64, 64)"
        assert (metadata["ss_network_module"], metadata["ss_network_dim"], metadata["ss_network_alpha"]) == \
            ("networks.lora", "2", "2.0")
        cond = in_thread(lambda: backend.encode_prompts(["a cat"]))
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
        t = torch.tensor([400])
        trained, base = lora_outputs(backend, "predict_eps", x, t, cond)
        assert (trained - base).abs().max() > 1e-5
    finally:
        backend.release()

    patched, not_loaded = lora_through_comfyui(family.model, comfy.utils.load_torch_file(str(result.lora_path)))
    assert not not_loaded, not_loaded
    assert len(patched.patches) == len(state) // 3
    through_loader = output_through_loader(family, patched, "predict_eps", x, t, cond)
    assert torch.allclose(through_loader, trained, atol=1e-4), (through_loader - trained).abs().max()


# --- the train node: width/height left at the default (0) train at the model's native size ------
class SizeSeen(Exception):
    pass


@pytest.mark.parametrize("kind, widgets, expected", [("sdxl", (0, 0), (1024, 1024)),
                                                     ("sd2-v", (0, 0), (768, 768)),
                                                     ("sdxl", (512, 512), (512, 512)),     # a user's choice
                                                     ("sdxl", (0, 768), (1024, 768)),
                                                     ("sdxl", (832, 1216), (832, 1216))])
def test_the_train_node_trains_at_the_native_size_when_the_size_is_left_at_its_default(
        kind, widgets, expected, monkeypatch):
    """The node's own size resolution, stopped at build_config (a full SDXL run at 1024 px is
    too slow for these CPUs)."""
    from comfy_inprocess import load_plugin_package

    plugin = load_plugin_package()
    node_class = plugin.NODE_CLASS_MAPPINGS["PRDPTrainLoRA"]
    defaults = node_class.INPUT_TYPES()["required"]
    assert (defaults["width"][1]["default"], defaults["height"][1]["default"]) == (0, 0)
    assert node_class.VALIDATE_INPUTS(width=widgets[0], height=widgets[1]) is True
    assert all(word in node_class.DESCRIPTION for word in ("SD1.x", "SD2.x", "v-prediction", "SDXL", "refused"))
    train_module = sys.modules[node_class.__module__]
    real_build_config = train_module.build_config

    def build_config(preset, **widgets):
        config = real_build_config(preset, **widgets)
        raise SizeSeen((config.width, config.height))

    monkeypatch.setattr(train_module, "build_config", build_config)
    family = tiny_family(kind)
    with torch.inference_mode(), pytest.raises(SizeSeen) as seen:
        node_class().train(family.model, family.clip, family.vae, None, prompts="a cat", negative_prompt="",
                           preset="cpu-smoke", epochs=1, prompts_per_epoch=1, images_per_prompt=2, steps=1,
                           cfg=1.0, beta=0.1, clip_range=0.01, updates_per_epoch=1, learning_rate=1e-3,
                           lora_rank=2, width=widgets[0], height=widgets[1], seed=1, lora_name="native")
    assert seen.value.args[0] == expected
