"""ComfyBackend trains discrete VP models (eps, v-prediction) and refuses flow-matching ones
(issue 7.3), on ComfyUI's real model-sampling objects.

ComfyUI builds every model-sampling object as `class ModelSampling(schedule, parameterisation)`
in `comfy.model_base.model_sampling(model_config, model_type)`, so a test on the class name
lets SD3/Flux (CONST + ModelSamplingDiscreteFlow / ModelSamplingFlux) through, and they would
be trained with VP formulas. The samplings here are built exactly that way, from the real
model configs of each model family.
"""
import pytest
import torch

from comfy_inprocess import import_comfy, load_tiny_sd15

import_comfy()

import comfy.model_base  # noqa: E402
import comfy.supported_models  # noqa: E402

from comfyui_prdp.backends.comfy_backend import ComfyBackend, vp_sigmas  # noqa: E402

ModelType = comfy.model_base.ModelType
#: (model config class, model type) as ComfyUI's model detection pairs them
ACCEPTED = {"EPS (SD1.5)": ("SD15", "EPS"), "V_PREDICTION (SD2.x 768-v)": ("SD20", "V_PREDICTION")}
REFUSED = {"FLOW / CONST (SD3)": ("SD3", "FLOW"), "FLUX / CONST (Flux)": ("Flux", "FLUX")}


def real_sampling(config_name: str, model_type: str):
    config_class = getattr(comfy.supported_models, config_name)
    config = config_class(dict(config_class.unet_config))
    return comfy.model_base.model_sampling(config, getattr(ModelType, model_type))


@pytest.mark.parametrize("case", list(ACCEPTED) + list(REFUSED))
def test_comfyui_names_every_sampling_class_the_same(case):
    """The premise of the bug: the class name says nothing about the parameterisation."""
    config_name, model_type = {**ACCEPTED, **REFUSED}[case]
    assert type(real_sampling(config_name, model_type)).__name__ == "ModelSampling"


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_eps_and_v_prediction_samplings_are_accepted_with_their_schedule(case):
    sampling = real_sampling(*ACCEPTED[case])
    sigmas = vp_sigmas(sampling)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    expected = ((1 - torch.cumprod(1 - betas, 0)) / torch.cumprod(1 - betas, 0)).sqrt()
    assert sigmas.dtype == torch.float32 and sigmas.device.type == "cpu" and sigmas.shape == (1000,)
    assert torch.allclose(sigmas.double(), expected, rtol=1e-4)


@pytest.mark.parametrize("case", list(REFUSED))
def test_flow_samplings_are_refused_with_a_clear_error(case):
    sampling = real_sampling(*REFUSED[case])
    assert isinstance(getattr(sampling, "sigmas", None), torch.Tensor)   # it looks like a schedule
    with pytest.raises(ValueError, match="flow matching") as error:
        vp_sigmas(sampling)
    message = str(error.value)
    assert "CONST" in message and "SD1.x/SD2.x/SDXL" in message and "\n" not in message


@pytest.fixture(scope="module")
def sd15():
    return load_tiny_sd15()


@pytest.mark.parametrize("case", list(REFUSED))
def test_the_backend_refuses_an_sd_model_patched_to_flow_sampling(sd15, case):
    """What the ModelSamplingSD3 / ModelSamplingFlux nodes do: an object patch on the MODEL.
    Refused before anything is attached (the user's model keeps no wrapper)."""
    model, clip, vae = sd15
    patched = model.clone()
    patched.add_object_patch("model_sampling", real_sampling(*REFUSED[case]))
    with torch.inference_mode(), pytest.raises(ValueError, match="flow matching"):
        ComfyBackend(patched, clip, vae, rank=2)
    assert patched.weight_wrapper_patches == {} and model.weight_wrapper_patches == {}
    assert all(not getattr(m, "weight_function", None) and not getattr(m, "bias_function", None)
               for m in model.model.diffusion_model.modules())


def test_the_backend_trains_an_sd_model_patched_to_v_prediction(sd15):
    model, clip, vae = sd15
    patched = model.clone()
    patched.add_object_patch("model_sampling", real_sampling(*ACCEPTED["V_PREDICTION (SD2.x 768-v)"]))
    with torch.inference_mode():
        backend = ComfyBackend(patched, clip, vae, rank=2)
    try:
        assert len(backend.adapters) > 0 and backend.alphas_cumprod.shape == (1000,)
    finally:
        backend.release()
