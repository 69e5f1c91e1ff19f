"""ComfyBackend tells discrete VP models (eps, v-prediction: the DDPM policy) from rectified-flow
ones (SD3, Flux: the flow-SDE policy) by their model-sampling classes, and refuses every other
sampling (EDM, continuous v, Cosmos RFlow) with a clear error, on ComfyUI's real objects.

ComfyUI builds every model-sampling object as `class ModelSampling(schedule, parameterisation)`
in `comfy.model_base.model_sampling(model_config, model_type)`, so a test on the class name
would train SD3/Flux (CONST + ModelSamplingDiscreteFlow / ModelSamplingFlux) with VP formulas
(issue 7.3). The samplings here are built exactly that way, from the real model configs.
"""
import math

import pytest
import torch

from comfy_inprocess import import_comfy

import_comfy()

import comfy.model_base  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.supported_models  # noqa: E402

from comfyui_prdp.backends.comfyui.backend import ComfyBackend  # noqa: E402
from comfyui_prdp.backends.comfyui.sampling_kind import flow_sigmas, sampling_kind, vp_sigmas  # noqa: E402

ModelType = comfy.model_base.ModelType
#: (model config class, model type) as ComfyUI's model detection pairs them
ACCEPTED = {"EPS (SD1.5)": ("SD15", "EPS"), "V_PREDICTION (SD2.x 768-v)": ("SD20", "V_PREDICTION")}
FLOW = {"FLOW / CONST (SD3)": ("SD3", "FLOW"), "FLUX / CONST (Flux)": ("Flux", "FLUX")}
#: samplings no policy here can give log-probs for (present in this ComfyUI's ModelType)
REFUSED = {name: case for name, case in {"EDM (continuous)": ("SD15", "EDM"),
                                         "V_PREDICTION_CONTINUOUS": ("SD15", "V_PREDICTION_CONTINUOUS"),
                                         "FLOW_COSMOS (Cosmos RFlow)": ("SD3", "FLOW_COSMOS")}.items()
           if hasattr(ModelType, case[1])}


def real_sampling(config_name: str, model_type: str):
    config_class = getattr(comfy.supported_models, config_name)
    config = config_class(dict(config_class.unet_config))
    return comfy.model_base.model_sampling(config, getattr(ModelType, model_type))


@pytest.mark.parametrize("case", list(ACCEPTED) + list(FLOW) + list(REFUSED))
def test_comfyui_names_every_sampling_class_the_same(case):
    """The premise of the bug: the class name says nothing about the parameterisation."""
    config_name, model_type = {**ACCEPTED, **FLOW, **REFUSED}[case]
    assert type(real_sampling(config_name, model_type)).__name__ == "ModelSampling"


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_eps_and_v_prediction_samplings_are_accepted_with_their_schedule(case):
    sampling = real_sampling(*ACCEPTED[case])
    sigmas = vp_sigmas(sampling)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    expected = ((1 - torch.cumprod(1 - betas, 0)) / torch.cumprod(1 - betas, 0)).sqrt()
    assert sigmas.dtype == torch.float32 and sigmas.device.type == "cpu" and sigmas.shape == (1000,)
    assert torch.allclose(sigmas.double(), expected, rtol=1e-4)


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_vp_samplings_are_vp(case):
    assert sampling_kind(real_sampling(*ACCEPTED[case])) == "vp"


@pytest.mark.parametrize("case", list(FLOW))
def test_flow_samplings_are_accepted_as_flow_with_their_own_schedule(case):
    sampling = real_sampling(*FLOW[case])
    assert isinstance(getattr(sampling, "sigmas", None), torch.Tensor)   # it looks like a VP schedule
    assert sampling_kind(sampling) == "flow"
    t = 1 - torch.arange(9, dtype=torch.float64) / 8
    if FLOW[case][1] == "FLOW":          # SD3: shift 3.0 in its sampling settings
        expected = 3.0 * t / (1 + 2.0 * t)
    else:                                # Flux: exp(mu) / (exp(mu) + 1/t - 1), mu = 1.15
        expected = torch.where(t > 0, torch.exp(torch.tensor(1.15, dtype=torch.float64)) /
                               (torch.exp(torch.tensor(1.15, dtype=torch.float64)) + 1 / t.clamp(min=1e-9) - 1),
                               torch.zeros_like(t))
    # at 8 steps (dividing the 1000-entry table) the schedule is the formula's, to float32 rounding
    assert torch.allclose(flow_sigmas(sampling, 8), expected, atol=1e-6)
    with pytest.raises(ValueError, match="flow matching") as error:     # never read as a VP schedule
        vp_sigmas(sampling)
    assert "CONST" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("case", list(REFUSED))
def test_other_samplings_are_refused_with_a_clear_error(case):
    with pytest.raises(ValueError, match="PRDP cannot sample it with log-probs") as error:
        sampling_kind(real_sampling(*REFUSED[case]))
    assert "\n" not in str(error.value)


def user_model_untouched(model):
    return model.weight_wrapper_patches == {} and all(
        not getattr(m, "weight_function", None) and not getattr(m, "bias_function", None)
        and "forward" not in m.__dict__ for m in model.model.diffusion_model.modules())


@pytest.mark.parametrize("case", list(REFUSED))
def test_the_backend_refuses_an_sd_model_patched_to_an_unsupported_sampling(sd15, case):
    """What a model-sampling node upstream does: an object patch on the MODEL. Refused before
    anything is attached (the user's model keeps no wrapper)."""
    model, clip, vae = sd15
    patched = model.clone()
    patched.add_object_patch("model_sampling", real_sampling(*REFUSED[case]))
    with torch.inference_mode(), pytest.raises(ValueError, match="PRDP cannot sample it"):
        ComfyBackend(patched, clip, vae, rank=2)
    assert patched.weight_wrapper_patches == {} and user_model_untouched(model)


@pytest.mark.parametrize("case", list(FLOW))
def test_an_sd_model_patched_to_flow_sampling_is_sampled_as_flow(sd15, case):
    """A ModelSamplingSD3 / ModelSamplingFlux node on a UNet model: the flow policy's terms
    (x0 predictions, the patched schedule), never VP formulas."""
    model, clip, vae = sd15
    patched = model.clone()
    sampling = real_sampling(*FLOW[case])
    patched.add_object_patch("model_sampling", sampling)
    with torch.inference_mode():
        backend = ComfyBackend(patched, clip, vae, rank=2)
    try:
        assert (backend.sampling_kind, backend.prediction) == ("flow", "x0")
        assert torch.equal(backend.flow_sigmas(5), flow_sigmas(sampling, 5))
        with pytest.raises(ValueError, match="no VP schedule"):
            backend.alphas_cumprod
    finally:
        backend.release()
    assert user_model_untouched(model)


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


def shifted_at(config_name: str, t: torch.Tensor) -> torch.Tensor:
    """The config's flow schedule at t, written out: SD3 shift 3.0, Flux exp(1.15)."""
    if config_name == "SD3":
        return 3.0 * t / (1 + 2.0 * t)
    return math.exp(1.15) / (math.exp(1.15) + 1 / t - 1)


#: entries of ComfyUI's sigma table (t = 1/n ... n/n): ModelSamplingDiscreteFlow 1000, ModelSamplingFlux 10000
TABLE_ENTRIES = {"SD3": 1000, "Flux": 10000}


@pytest.mark.parametrize("steps", [8, 12, 16, 28, 38])
@pytest.mark.parametrize("case", list(FLOW))
def test_flow_sigmas_are_comfyuis_simple_scheduler(case, steps):
    """Training samples the schedule users compare with: KSampler's "simple" scheduler, equal in
    float32 to ComfyUI's own function at every step count (at 38 its floating-point index picks
    table entry 499 where exact arithmetic gives 500)."""
    sampling = real_sampling(*FLOW[case])
    sigmas = flow_sigmas(sampling, steps)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (steps + 1,)
    assert torch.equal(sigmas.float(), comfy.samplers.simple_scheduler(sampling, steps))


@pytest.mark.parametrize("steps", [8, 12, 16, 28])
@pytest.mark.parametrize("case", list(FLOW))
def test_flow_sigmas_match_an_independent_simple_schedule(case, steps):
    """Independently: step i sits at the table's time t = (n - floor(i n / N)) / n (exact integer
    arithmetic; n = TABLE_ENTRIES), the shifted formula there; 0 at the end. Where N does not
    divide n that is not percent_to_sigma(i / N), the schedule used before (SD3 at 12, 16, 28
    steps: 1-2e-3 away; Flux at 12, 28: ~2e-4)."""
    config_name = FLOW[case][0]
    n = TABLE_ENTRIES[config_name]
    sampling = real_sampling(*FLOW[case])
    assert len(sampling.sigmas) == n
    t = torch.tensor([(n - i * n // steps) / n for i in range(steps)], dtype=torch.float64)
    expected = torch.cat([shifted_at(config_name, t), torch.zeros(1, dtype=torch.float64)])
    assert torch.allclose(flow_sigmas(sampling, steps), expected, atol=1e-6)
    by_percent = torch.tensor([float(sampling.percent_to_sigma(i / steps)) for i in range(steps + 1)],
                              dtype=torch.float64)
    gap = (by_percent - expected).abs().max().item()
    assert (gap < 1e-6) == (n % steps == 0), gap
    assert n % steps == 0 or gap > 1e-4, gap


def noise_scaled(config_name: str, model_type: str, scale: float):
    """A real flow sampling with ComfyUI 0.33's CONST `noise_scale` set (HiDream-O1's config sets 8)."""
    sampling = real_sampling(config_name, model_type)
    sampling.noise_scale = scale
    return sampling


@pytest.mark.parametrize("case", list(FLOW))
def test_a_flow_sampling_with_a_noise_scale_is_refused_in_one_line(case):
    with pytest.raises(ValueError, match="noise_scale 8") as error:
        sampling_kind(noise_scaled(*FLOW[case], 8.0))
    assert "\n" not in str(error.value)
    assert sampling_kind(noise_scaled(*FLOW[case], 1.0)) == "flow"        # unit noise: trained as before


def test_hidream_o1s_real_sampling_is_refused_for_its_noise_scale():
    if not hasattr(comfy.supported_models, "HiDreamO1"):
        pytest.skip("this ComfyUI has no HiDream-O1 (added before 0.33)")
    sampling = real_sampling("HiDreamO1", "FLOW")
    assert sampling.noise_scale == 8.0
    with pytest.raises(ValueError, match="noise_scale 8"):
        sampling_kind(sampling)


def test_the_backend_refuses_a_noise_scaled_flow_sampling_before_any_work(sd15):
    model, clip, vae = sd15
    patched = model.clone()
    patched.add_object_patch("model_sampling", noise_scaled("SD3", "FLOW", 8.0))
    with torch.inference_mode(), pytest.raises(ValueError, match="noise_scale 8"):
        ComfyBackend(patched, clip, vae, rank=2)
    assert patched.weight_wrapper_patches == {} and user_model_untouched(model)


def test_a_unet_with_flow_sampling_exports_the_kohya_keys_of_a_plain_unet(sd15):
    """Key names follow the architecture: a ModelSamplingSD3 node on a UNet changes its sampling,
    not its module names, so the file keeps the diffusers-named kohya keys A1111/Forge read."""
    model, clip, vae = sd15
    patched = model.clone()
    patched.add_object_patch("model_sampling", real_sampling(*FLOW["FLOW / CONST (SD3)"]))
    keys = {}
    for name, source in (("plain", model), ("flow", patched)):
        with torch.inference_mode():
            backend = ComfyBackend(source, clip, vae, rank=2)
        try:
            keys[name] = set(backend.lora_state_dict())
            assert backend.sampling_kind == ("flow" if name == "flow" else "vp")
        finally:
            backend.release()
    assert keys["flow"] == keys["plain"]
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys["flow"]
    assert not any(k.startswith("lora_unet_input_blocks") for k in keys["flow"])
