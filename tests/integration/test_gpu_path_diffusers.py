"""The command line's GPU memory path (issue 20, section 2 and the diffusers items of section 3),
checked on the CPU:
- loading: from_pretrained / from_single_file get the training dtype (VAE float32, T5 float32
  under fp16), so nothing is materialised in float32 first;
- placement: on a simulated GPU (moves that really copy, "cuda" backed by the CPU) no frozen
  module ever sits on the device in float32 when it trains in half precision: cast, then move;
- the text encoders visit the device for one encode call and wait on the CPU otherwise;
- the VAE decodes at most DECODE_PIXELS pixels per call (one 1024 x 1024 SDXL image);
- gradient checkpointing recomputes blocks in the backward pass in the backend's eval state;
- SD3's timestep reaches the transformer as 1000 sigma in float32 when the model is bf16;
- Flux's frozen base stored in fp8 (bf16 / float32 compute): the LoRA forward works, its
  gradients are those of the fp8-rounded model, and the choice is automatic on a 24 GB card.
"""
import contextlib
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfyui_prdp.models import loading as model_loading  # noqa: E402
from comfyui_prdp.backends import diffusers_backend, diffusers_flow  # noqa: E402
from comfyui_prdp.backends.diffusers_backend import DiffusersBackend, decode_batch_size  # noqa: E402
from comfyui_prdp.backends.diffusers_flow import (DiffusersFluxBackend, DiffusersSD3Backend,  # noqa: E402
                                                  FP8_STORAGE, flux_needs_fp8)
from comfyui_prdp.config import TrainConfig  # noqa: E402
from comfyui_prdp.models.embedded import build_embedded_pipeline, build_embedded_stable_diffusion_pipeline  # noqa: E402
import test_diffusers_flow as flow_fixtures  # noqa: E402
import test_diffusers_sdxl as sdxl_fixtures  # noqa: E402

CONFIG = TrainConfig(epochs=1, prompts_per_epoch=2, images_per_prompt=2, updates_per_epoch=1, steps=2, cfg=1.0,
                     lora_rank=2, width=64, height=64, sample_batch_size=4, train_batch_size=4, seed=0)
GIB = 1024 ** 3


# --- a simulated GPU: "cuda" is the CPU, every move really copies, module locations are tracked
class SimulatedGPU:
    """Inside `active()`: Tensor.to(device="cuda"...) copies on the CPU; each Module.to naming a
    device records where the module's parameters now are (`where`), and every Module.to call
    records the (location, dtype) of each parameter it touched (`states`)."""

    def __init__(self):
        self.location = {}          # id(parameter) -> "cpu" / "cuda"
        self.states = []            # (module, parameter name, location, dtype) after each Module.to
        self.moves = []             # (module, device type) of each Module.to naming a device

    def where(self, module) -> set:
        return {self.location.get(id(p), "cpu") for p in module.parameters()}

    @contextlib.contextmanager
    def active(self):
        tensor_to, module_to = torch.Tensor.to, torch.nn.Module.to
        sim = self

        def fake_tensor_to(tensor, *args, **kwargs):
            kwargs.pop("copy", None)
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
            if device is None:
                return tensor_to(tensor, *args, **kwargs)
            return tensor_to(tensor, torch.device("cpu"), dtype=dtype, non_blocking=non_blocking, copy=True)

        def fake_module_to(module, *args, **kwargs):
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            result = module_to(module, *args, **kwargs)
            if device is not None:
                sim.moves.append((module, device.type))
                for parameter in module.parameters():
                    sim.location[id(parameter)] = device.type
            for name, parameter in module.named_parameters():
                sim.states.append((module, name, sim.location.get(id(parameter), "cpu"), parameter.dtype))
            return result

        torch.Tensor.to, torch.nn.Module.to = fake_tensor_to, fake_module_to
        try:
            yield self
        finally:
            torch.Tensor.to, torch.nn.Module.to = tensor_to, module_to


def sd_components():
    return build_embedded_pipeline(0, pretrained=False)


def build(kind, device="cuda", **config):
    """A tiny backend of `kind` on `device` (inside SimulatedGPU.active() for "cuda")."""
    config = CONFIG.replace(**config)
    if kind == "sd":
        return DiffusersBackend.from_components(**sd_components(), config=config, device=device)
    if kind == "sdxl":
        from comfyui_prdp.backends.diffusers_sdxl import DiffusersSDXLBackend
        return DiffusersSDXLBackend(**sdxl_fixtures.tiny_components(), config=config, device=device)
    config = config.replace(width=16, height=16, policy="flow_sde")
    if kind == "flux":
        return DiffusersFluxBackend(**flow_fixtures.flux_components(), config=config, device=device, fp8_base=False)
    return DiffusersSD3Backend(**flow_fixtures.sd3_components(with_t5=True), config=config, device=device)


def denoiser(backend):
    return backend.transformer if backend.sampling_kind == "flow" else backend.unet


KINDS = ["sd", "sdxl", "sd3", "flux"]


# --- 1. load in the training dtype, cast before moving ------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_no_frozen_module_is_ever_float32_on_the_gpu_when_it_trains_in_half(kind, precision):
    sim = SimulatedGPU()
    with sim.active():
        backend = build(kind, mixed_precision=precision)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert backend.dtype == half
    lora = {id(p) for p in backend.trainable_parameters()}
    frozen_half = [denoiser(backend)] + [e for e in backend.text_encoder_modules()
                                         if backend._encoder_dtype(e) == half]
    watched = {id(p) for module in frozen_half for p in module.parameters() if id(p) not in lora}
    float32_on_gpu = sorted({name for module, name, where, dtype in sim.states
                             if where == "cuda" and dtype == torch.float32
                             and id(dict(module.named_parameters())[name]) in watched})
    assert float32_on_gpu == [], f"float32 on the GPU before the cast: {float32_on_gpu[:5]}"
    assert sim.where(denoiser(backend)) == {"cuda"} and sim.where(backend.vae) == {"cuda"}
    assert {p.dtype for p in backend.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in backend.trainable_parameters()} == {torch.float32}     # the LoRA trains in float32
    assert {p.dtype for p in denoiser(backend).parameters() if id(p) not in lora} == {half}


@pytest.mark.parametrize("kind", ["sd", "flux"])
def test_the_lora_trains_in_float32_when_the_model_was_loaded_in_half(kind):
    """load_backend loads the denoiser in the training dtype, and peft creates the LoRA in the dtype
    of the layer it adapts: the backend must still train it in float32 (and Flux's fp8 storage,
    which skips peft layers, must accept it)."""
    sim = SimulatedGPU()
    config = CONFIG.replace(mixed_precision="bf16")
    if kind == "sd":
        components = sd_components()
        components["unet"].to(torch.bfloat16)
        with sim.active():
            backend = DiffusersBackend.from_components(**components, config=config, device="cuda")
    else:
        components = flow_fixtures.flux_components()
        components["transformer"].to(torch.bfloat16)
        with sim.active():
            backend = DiffusersFluxBackend(**components, config=config.replace(width=16, height=16, policy="flow_sde"),
                                           device="cuda", fp8_base=True)
        assert backend.base_storage_dtype == diffusers_flow.FP8_STORAGE
    assert {p.dtype for p in backend.trainable_parameters()} == {torch.float32}


def test_t5_stays_float32_under_fp16():
    sim = SimulatedGPU()
    with sim.active():
        backend = build("sd3", mixed_precision="fp16")
    t5 = backend.text_encoders[2]
    assert {p.dtype for p in t5.parameters()} == {torch.float32}
    assert {p.dtype for p in backend.text_encoders[0].parameters()} == {torch.float16}


class LoadSpy:
    """Records the keyword arguments of a classmethod loader (from_pretrained / from_single_file)."""

    def __init__(self, monkeypatch, cls, name):
        self.calls = []
        original = getattr(cls, name).__func__

        def spy(klass, *args, **kwargs):
            self.calls.append(kwargs)
            return original(klass, *args, **kwargs)
        monkeypatch.setattr(cls, name, classmethod(spy))

    def dtype(self):
        (kwargs,) = self.calls
        return kwargs.get("dtype", kwargs.get("torch_dtype"))


@pytest.fixture(scope="module")
def saved_sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    build_embedded_stable_diffusion_pipeline(0).save_pretrained(str(folder))
    return folder


def test_a_diffusers_folder_loads_in_the_training_dtype_with_a_float32_vae(saved_sd, monkeypatch):
    spy = LoadSpy(monkeypatch, diffusers.StableDiffusionPipeline, "from_pretrained")
    components, _ = model_loading.load_components(str(saved_sd), dtype=torch.float16)
    assert spy.dtype() == {"default": torch.float16, "vae": torch.float32}
    assert {p.dtype for p in components["unet"].parameters()} == {torch.float16}
    assert {p.dtype for p in components["text_encoder"].parameters()} == {torch.float16}
    assert {p.dtype for p in components["vae"].parameters()} == {torch.float32}


def test_load_backend_passes_the_dtype_the_backend_trains_in(saved_sd, monkeypatch):
    """load_backend knows the device and the precision: CUDA + fp16 loads fp16 (here the CPU
    stands in for CUDA in frozen_weight_dtype only, and the backend then computes in float32)."""
    spy = LoadSpy(monkeypatch, diffusers.StableDiffusionPipeline, "from_pretrained")
    monkeypatch.setattr(model_loading, "frozen_weight_dtype", lambda device, precision: torch.float16)
    model_loading.load_backend(str(saved_sd), CONFIG.replace(mixed_precision="fp16"), device="cpu")
    assert spy.dtype()["default"] == torch.float16
    spy.calls.clear()
    monkeypatch.undo()
    spy = LoadSpy(monkeypatch, diffusers.StableDiffusionPipeline, "from_pretrained")
    model_loading.load_backend(str(saved_sd), CONFIG.replace(mixed_precision="fp16"), device="cpu")
    assert spy.dtype()["default"] == torch.float32          # the CPU trains in float32


def test_a_flux_folder_loads_t5_in_float32_under_fp16(tmp_path, monkeypatch):
    folder = tmp_path / "tiny-flux"
    diffusers.FluxPipeline(**flow_fixtures.flux_components()).save_pretrained(str(folder))
    spy = LoadSpy(monkeypatch, diffusers.FluxPipeline, "from_pretrained")
    components, _ = model_loading.load_components(str(folder), dtype=torch.float16)
    assert spy.dtype() == {"default": torch.float16, "vae": torch.float32, "text_encoder_2": torch.float32}
    assert {p.dtype for p in components["transformer"].parameters()} == {torch.float16}
    assert {p.dtype for p in components["text_encoder_2"].parameters()} == {torch.float32}
    assert {p.dtype for p in components["vae"].parameters()} == {torch.float32}


def test_a_single_file_loads_in_the_training_dtype_with_a_float32_vae(saved_sd, tmp_path, monkeypatch):
    from test_model_loading import write_ldm_checkpoint

    pipe = build_embedded_stable_diffusion_pipeline(0)
    path = write_ldm_checkpoint(pipe, tmp_path / "tiny-sd-v1.safetensors")
    spy = LoadSpy(monkeypatch, diffusers.StableDiffusionPipeline, "from_single_file")
    components, _ = model_loading.load_components(str(path), base_config=str(saved_sd), dtype=torch.bfloat16)
    assert spy.dtype() == torch.bfloat16
    assert {p.dtype for p in components["unet"].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in components["vae"].parameters()} == {torch.float32}
    # the VAE is the file's float32 weights, not a bf16 round trip
    for name, value in pipe.vae.state_dict().items():
        assert torch.equal(components["vae"].state_dict()[name], value), name


# --- 2. the text encoders: on the GPU only while they encode ------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_text_encoders_visit_the_gpu_only_for_each_encode_call(kind):
    sim = SimulatedGPU()
    with sim.active():
        backend = build(kind, mixed_precision="bf16")
        encoders = backend.text_encoder_modules()
        seen_at_forward, others_at_forward = [], []

        def watch(module, args):
            seen_at_forward.append(sim.where(module))
            others_at_forward.append(set().union(*[sim.where(e) for e in encoders if e is not module]))

        hooks = [e.register_forward_pre_hook(watch) for e in encoders]
        for encoder in encoders:
            assert sim.where(encoder) == {"cpu"}, "the encoders wait on the CPU after loading"
        for prompts in (["a red apple", "a blue car"], ["a cat"], [""]):     # a lazily encoded prompt file
            before = len(sim.moves)
            cond = backend.encode_prompts(prompts)
            encoder_moves = [device for module, device in sim.moves[before:] if any(module is e for e in encoders)]
            assert encoder_moves == ["cuda", "cpu"] * len(encoders)    # each in once, out once, one at a time
            for encoder in encoders:
                assert sim.where(encoder) == {"cpu"}
            assert all(value.shape[0] == len(prompts) for value in cond.values())
        for hook in hooks:
            hook.remove()
    assert seen_at_forward and all(where == {"cuda"} for where in seen_at_forward), "encoding runs on the device"
    assert all(where <= {"cpu"} for where in others_at_forward), "one text encoder on the GPU at a time"
    assert [device for module, device in sim.moves if module is denoiser(backend)] == ["cuda"], \
        "the denoiser moves once, at construction"


def test_encoders_stay_on_the_device_when_offloading_is_off():
    sim = SimulatedGPU()
    with sim.active():
        backend = DiffusersBackend.from_components(**sd_components(), config=CONFIG.replace(mixed_precision="bf16"),
                                                   device="cuda")
        backend.offload_text_encoders = False
        backend._place_text_encoders(backend.text_encoder_home)
        before = len(sim.moves)
        backend.encode_prompts(["a cat"])
    assert sim.where(backend.text_encoder) == {"cuda"} and len(sim.moves) == before


# --- 3. the VAE decodes a bounded number of pixels per call -------------------------------
@pytest.mark.parametrize("size, batch, expected", [(1024, 2, 1), (1024, 1, 1), (512, 8, 4), (512, 2, 2),
                                                   (768, 4, 1), (64, 16, 16), (2048, 2, 1)])
def test_decode_batch_size_bounds_the_pixels_per_decode(size, batch, expected):
    config = CONFIG.replace(width=size, height=size, sample_batch_size=batch)
    assert decode_batch_size(config) == expected
    assert expected * size * size <= max(size * size, diffusers_backend.DECODE_PIXELS)


def test_sdxl_at_1024_decodes_one_image_per_vae_call():
    backend = build("sdxl", device="cpu", width=1024, height=1024, sample_batch_size=2)
    sizes = []
    original = backend.vae.decode

    def counting_decode(z, *args, **kwargs):
        sizes.append(z.shape[0])
        return original(z, *args, **kwargs)
    backend.vae.decode = counting_decode
    images = backend.decode(torch.randn(2, *backend.latent_shape(64, 64)))
    assert images.shape[0] == 2 and sizes == [1, 1]


# --- 4. gradient checkpointing really recomputes in the backend's eval state --------------
@pytest.mark.parametrize("checkpointing", [True, False])
def test_gradient_checkpointing_recomputes_blocks_in_the_backward_pass(checkpointing):
    backend = build("sd", device="cpu", gradient_checkpointing=checkpointing)
    unet = backend.unet
    assert not unet.training and not any(m.training for m in unet.modules())   # eval: no dropout
    calls = {"forward": 0, "backward": 0}
    phase = ["forward"]
    # diffusers checkpoints each resnet and each transformer block; these two lie on the LoRA's gradient
    # path. Pre-hooks: a checkpoint's recomputation stops as soon as it has what backward needs, before
    # the block returns, so forward hooks would not see it
    for block in (unet.up_blocks[-1].resnets[-1], unet.up_blocks[-1].attentions[-1].transformer_blocks[0]):
        block.register_forward_pre_hook(lambda *args: calls.__setitem__(phase[0], calls[phase[0]] + 1))
    x = torch.randn(2, *backend.latent_shape(64, 64))
    cond = backend.encode_prompts(["a", "b"])
    out = backend.predict_eps(x, torch.tensor([500, 300]), cond)
    phase[0] = "backward"
    out.square().mean().backward()
    assert calls["forward"] == 2
    assert calls["backward"] == (2 if checkpointing else 0), "checkpointing recomputes the blocks in backward"
    assert all(p.grad is not None for p in backend.trainable_parameters())


# --- 5. SD3's timestep in float32 ---------------------------------------------------------
def test_sd3_timestep_reaches_a_bf16_transformer_as_1000_sigma_in_float32():
    backend = build("sd3", device="cpu")
    backend.transformer.to(torch.bfloat16)
    for p in backend.trainable_parameters():
        p.data = p.data.float()
    backend.dtype = torch.bfloat16
    seen = []
    backend.transformer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["timestep"]),
                                                  with_kwargs=True)
    sigma = torch.tensor([0.6173, 0.9871], dtype=torch.float64)
    cond = backend.encode_prompts(["a", "b"])
    with torch.no_grad():
        backend.predict(torch.randn(2, *backend.latent_shape(16, 16)), sigma, cond)
    (timestep,) = seen
    assert timestep.dtype == torch.float32
    assert torch.equal(timestep, sigma.float() * 1000)       # 617.3, 987.1: bf16 would give 616, 988


# --- 6. Flux: the frozen base stored in fp8 -----------------------------------------------
def _flux(fp8, seed_lora=1):
    backend = DiffusersFluxBackend(**flow_fixtures.flux_components(), device="cpu", fp8_base=fp8,
                                   config=CONFIG.replace(width=16, height=16, policy="flow_sde",
                                                         gradient_checkpointing=True))
    flow_fixtures.randomize_lora(backend, seed=seed_lora)
    return backend


def _velocity_and_lora_grad(backend):
    x = torch.randn(2, *backend.latent_shape(16, 16), generator=torch.Generator().manual_seed(0))
    v = backend.predict(x, torch.tensor([0.5, 0.8]), backend.encode_prompts(["a", "b"]))
    v.square().mean().backward()
    return v.detach(), torch.cat([p.grad.flatten() for p in backend.trainable_parameters()])


def test_flux_fp8_base_stores_linear_weights_in_fp8_and_trains_the_float32_lora():
    backend = _flux(fp8=True)
    assert backend.base_storage_dtype == FP8_STORAGE
    lora = {id(p) for p in backend.trainable_parameters()}
    stored = {name: p.dtype for name, p in backend.transformer.named_parameters() if id(p) not in lora}
    fp8 = [name for name, dtype in stored.items() if dtype == FP8_STORAGE]
    assert any(name.endswith("attn.to_q.base_layer.weight") for name in fp8)
    assert any(name.startswith("single_transformer_blocks.0.proj_mlp") for name in fp8)
    assert not any("norm" in name for name in fp8)
    assert sum(stored[name] == FP8_STORAGE for name in stored) > len(stored) // 2
    assert {p.dtype for p in backend.trainable_parameters()} == {torch.float32}

    velocity, grad = _velocity_and_lora_grad(backend)
    assert torch.isfinite(velocity).all() and grad.abs().sum() > 0
    assert {name: p.dtype for name, p in backend.transformer.named_parameters() if id(p) not in lora} == stored

    # the same as the float32 model with its weights rounded through fp8: the base changes, nothing else
    reference = _flux(fp8=False)
    with torch.no_grad():
        params = dict(backend.transformer.named_parameters())
        for name, p in reference.transformer.named_parameters():
            if id(p) not in {id(q) for q in reference.trainable_parameters()}:
                p.copy_(params[name].float())
    ref_velocity, ref_grad = _velocity_and_lora_grad(reference)
    torch.testing.assert_close(velocity, ref_velocity, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-8)


class _StandIn(torch.nn.Module):
    """A transformer with Flux.1-dev's parameter count (11.9 B), allocated nowhere (meta)."""

    def __init__(self, count=11_901_408_320):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(count, device="meta"))


@pytest.mark.parametrize("card_gib, precision, expected", [(24, "bf16", True), (32, "bf16", False),
                                                             (48, "bf16", False), (80, "bf16", False),
                                                             (48, "no", True)])
def test_flux_picks_fp8_storage_when_its_weights_do_not_fit_the_card(card_gib, precision, expected, monkeypatch):
    monkeypatch.setattr(diffusers_flow, "gpu_memory_bytes", lambda device: card_gib * GIB)
    config = CONFIG.replace(mixed_precision=precision)
    assert flux_needs_fp8(_StandIn(), torch.device("cuda"), config) is expected
    assert flux_needs_fp8(_StandIn(), torch.device("cpu"), config) is False
