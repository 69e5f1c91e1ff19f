"""DiffusersBackend on the embedded tiny model: the Backend contract, the LoRA switch, prediction
types, decoding, precision and checkpointing settings."""
import pytest
import torch

from comfyui_prdp.backends.diffusers_backend import (DiffusersBackend, frozen_weight_dtype,
                                                     resolve_device)
from comfyui_prdp.config import preset
from comfyui_prdp.models.embedded import MODEL_NAME, build_embedded_pipeline


def make_backend(**overrides):
    config = preset("cpu-smoke", **overrides)
    return DiffusersBackend.from_components(**build_embedded_pipeline(0), config=config, device="cpu",
                                            model_name=MODEL_NAME)


def randomize_lora(backend, seed=1, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in backend.trainable_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def inputs(backend, n=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *backend.latent_shape(64, 64), generator=generator)
    t = torch.tensor([999, 500, 21][:n])
    cond = backend.encode_prompts(["a red apple", "a blue sky", ""][:n])
    return x, t, cond


@pytest.fixture(scope="module")
def backend():
    return make_backend()


def test_schedule_and_shapes(backend):
    scheduler = build_embedded_pipeline(0)["scheduler"]
    alphas = backend.alphas_cumprod
    assert alphas.dtype == torch.float64 and alphas.device.type == "cpu" and alphas.shape == (1000,)
    assert torch.allclose(alphas, scheduler.alphas_cumprod.double())
    assert tuple(backend.latent_shape(64, 64)) == (4, 8, 8)
    assert tuple(backend.latent_shape(128, 64)) == (4, 16, 8)
    with pytest.raises(ValueError, match="multiple of 8"):
        backend.latent_shape(60, 64)


def test_encode_prompts(backend):
    cond = backend.encode_prompts(["a cat", "a dog", "a cat"])
    context = cond["context"]
    assert set(cond) == {"context"}
    assert context.shape == (3, 77, 32) and not context.requires_grad
    assert torch.equal(context[0], context[2])
    assert not torch.allclose(context[0], context[1])
    with pytest.raises(TypeError):
        backend.encode_prompts("a single string")


def test_only_lora_trains_and_model_is_in_eval_mode(backend):
    trainable = backend.trainable_parameters()
    info = backend.lora_info()
    # independently: every Linear named to_q/to_k/to_v/to_out.0 of a fresh UNet gets rank-4 A and B
    fresh = build_embedded_pipeline(0)["unet"]
    targets = [m for name, m in fresh.named_modules()
               if name.endswith(("to_q", "to_k", "to_v", "to_out.0")) and isinstance(m, torch.nn.Linear)]
    assert len(targets) > 0 and info["adapted_modules"] == len(targets)
    assert info["rank"] == 4 and info["alpha"] == 4.0
    expected_count = sum(4 * (m.in_features + m.out_features) for m in targets)
    assert sum(p.numel() for p in trainable) == info["trainable_parameters"] == expected_count
    assert all(p.requires_grad and p.dtype == torch.float32 for p in trainable)
    trainable_ids = {id(p) for p in trainable}
    for module in (backend.unet, backend.text_encoder, backend.vae):
        assert not module.training and not any(m.training for m in module.modules())
        for name, parameter in module.named_parameters():
            assert parameter.requires_grad == (id(parameter) in trainable_ids), name


def test_lora_starts_with_no_effect_and_adapters_disabled_gives_the_base_model():
    backend = make_backend()
    x, t, cond = inputs(backend)
    with torch.no_grad():
        base = backend.predict_eps(x, t, cond)
        with backend.adapters_disabled():
            assert torch.equal(backend.predict_eps(x, t, cond), base)   # lora_B = 0 at start
        randomize_lora(backend)
        tuned = backend.predict_eps(x, t, cond)
        with backend.adapters_disabled():
            with backend.adapters_disabled():   # nesting keeps the base model
                assert torch.equal(backend.predict_eps(x, t, cond), base)
            assert torch.equal(backend.predict_eps(x, t, cond), base)
        again = backend.predict_eps(x, t, cond)
    assert (tuned - base).abs().max() > 1e-2
    assert torch.equal(again, tuned)   # the LoRA is back on after the context
    assert all(p.requires_grad for p in backend.trainable_parameters())


def test_adapters_come_back_after_an_exception():
    backend = make_backend()
    randomize_lora(backend)
    x, t, cond = inputs(backend, n=1)
    with torch.no_grad():
        tuned = backend.predict_eps(x, t, cond)
        with pytest.raises(RuntimeError):
            with backend.adapters_disabled():
                raise RuntimeError("boom")
        assert torch.equal(backend.predict_eps(x, t, cond), tuned)


def test_gradients_reach_only_the_lora():
    backend = make_backend()
    randomize_lora(backend, scale=0.1)
    x, t, cond = inputs(backend)
    backend.predict_eps(x, t, cond).square().mean().backward()
    grads = [p.grad for p in backend.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    for module in (backend.unet, backend.text_encoder, backend.vae):
        assert all(p.grad is None for p in module.parameters() if not p.requires_grad)


def test_gradient_checkpointing_keeps_outputs_and_gradients():
    backend = make_backend()
    randomize_lora(backend, scale=0.1)
    x, t, cond = inputs(backend)

    def output_and_grads():
        for p in backend.trainable_parameters():
            p.grad = None
        out = backend.predict_eps(x, t, cond)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in backend.trainable_parameters()]

    plain_out, plain_grads = output_and_grads()
    backend.set_gradient_checkpointing(True)
    assert backend.unet.is_gradient_checkpointing
    ckpt_out, ckpt_grads = output_and_grads()
    backend.set_gradient_checkpointing(False)
    assert not backend.unet.is_gradient_checkpointing
    assert torch.allclose(plain_out, ckpt_out, atol=1e-6)
    for a, b in zip(plain_grads, ckpt_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_config_switches_checkpointing_on():
    assert make_backend(gradient_checkpointing=True).unet.is_gradient_checkpointing


def _backend_with_prediction_type(prediction_type):
    components = build_embedded_pipeline(0)
    scheduler_class = type(components["scheduler"])
    components["scheduler"] = scheduler_class.from_config(components["scheduler"].config,
                                                          prediction_type=prediction_type)
    return DiffusersBackend.from_components(**components, config=preset("cpu-smoke"), device="cpu")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_convert_to_eps(prediction_type, monkeypatch):
    """A stand-in UNet answers exactly what a perfect model of each type would; the backend must
    recover the true noise. Targets come from diffusers' scheduler (add_noise, get_velocity)."""
    backend = _backend_with_prediction_type(prediction_type)
    scheduler = build_embedded_pipeline(0)["scheduler"]
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 4, 8, 8, generator=generator)
    noise = torch.randn(4, 4, 8, 8, generator=generator)
    t = torch.tensor([999, 600, 250, 1])
    x_t = scheduler.add_noise(x0, noise, t)
    answer = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x0, noise, t), "sample": x0}[prediction_type]

    class Output:
        sample = answer

    monkeypatch.setattr(backend.unet, "forward", lambda *args, **kwargs: Output())
    cond = {"context": torch.zeros(4, 77, 32)}
    eps = backend.predict_eps(x_t, t, cond)
    assert torch.allclose(eps.float(), noise, atol=2e-4)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        _backend_with_prediction_type("flow")


def test_decode_maps_vae_output_to_0_1_images(backend):
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(3, 4, 8, 8, generator=generator) * 2
    images = backend.decode(latents)
    assert images.shape == (3, 64, 64, 3) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        pixels = backend.vae.decode(latents / backend.vae.config.scaling_factor).sample
    expected = ((pixels + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    assert torch.allclose(images, expected, atol=1e-6)
    backend.decode_batch_size = 2   # chunked decoding gives the same images
    assert torch.allclose(backend.decode(latents), images, atol=1e-5)


def test_embedded_model_is_deterministic_and_not_degenerate():
    # the random initialisation depends on the seed only (pretrained=False: no cached pretraining,
    # which would cost a minute for a new seed); the pretrained default is reproducible too
    a, b, c = (build_embedded_pipeline(s, pretrained=False) for s in (0, 0, 1))
    pretrained = [dict(build_embedded_pipeline(0)["unet"].named_parameters()) for _ in range(2)]
    assert all(torch.equal(pretrained[0][k], pretrained[1][k]) for k in pretrained[0])
    assert any(not torch.equal(pretrained[0][k], p) for k, p in a["unet"].named_parameters())
    for name in ("unet", "vae", "text_encoder"):
        pa, pb, pc = (dict(m[name].named_parameters()) for m in (a, b, c))
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
        assert any(not torch.equal(pa[k], pc[k]) for k in pa)
    # images from prompt-conditioned sampling-like latents: varied, not constant or saturated
    backend = make_backend()
    latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 5
    images = backend.decode(latents)
    assert 0.2 < images.mean() < 0.8
    assert images.flatten(1).std(dim=1).min() > 0.05
    assert ((images < 0.01) | (images > 0.99)).float().mean() < 0.2
    assert (images[0] - images[1]).abs().mean() > 0.02


def test_bad_lora_targets_name_the_problem():
    with pytest.raises(ValueError, match="LoRA targets"):
        make_backend(lora_targets=["no_such_layer"])


def test_lora_rank_alpha_and_targets_follow_the_config():
    backend = make_backend(lora_rank=2, lora_alpha=1.0, lora_targets=["to_q", "to_v"])
    info = backend.lora_info()
    assert info["rank"] == 2 and info["alpha"] == 1.0
    assert info["adapted_modules"] == make_backend().lora_info()["adapted_modules"] // 2
    layer = next(iter(backend._lora_layers.values()))
    assert layer.scaling["prdp"] == pytest.approx(0.5)
    assert all(name.endswith(("to_q", "to_v")) for name in backend._lora_layers)


def test_device_and_dtype_choice():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert frozen_weight_dtype(cuda, "fp16") == torch.float16
    assert frozen_weight_dtype(cuda, "bf16") == torch.bfloat16
    assert frozen_weight_dtype(cuda, "no") == torch.float32
    assert frozen_weight_dtype(cpu, "fp16") == torch.float32
    backend = make_backend(mixed_precision="bf16")   # on the CPU: everything stays float32
    assert backend.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in backend.unet.parameters())
    x, t, cond = inputs(backend, n=1)
    assert backend.predict_eps(x, t, cond).dtype == torch.float32


def test_from_pipeline_equals_from_components():
    from comfyui_prdp.models.embedded import build_embedded_stable_diffusion_pipeline

    a = DiffusersBackend.from_pipeline(build_embedded_stable_diffusion_pipeline(0), preset("cpu-smoke"),
                                       device="cpu", model_name="x")
    b = make_backend()
    x, t, cond = inputs(b)
    with torch.no_grad():
        assert torch.equal(a.predict_eps(x, t, cond), b.predict_eps(x, t, cond))
    assert a.model_name == "x"
    with pytest.raises(ValueError, match="lacks"):
        DiffusersBackend.from_pipeline(object(), preset("cpu-smoke"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mixed_precision", ["fp16", "bf16"])
def test_mixed_precision_on_cuda(mixed_precision):
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    config = preset("cpu-smoke", mixed_precision=mixed_precision)
    backend = DiffusersBackend.from_components(**build_embedded_pipeline(0), config=config, device="cuda")
    reference = make_backend()
    randomize_lora(backend, scale=0.1)
    randomize_lora(reference, scale=0.1)
    assert backend.dtype == half
    assert all(p.dtype == torch.float32 for p in backend.trainable_parameters())
    frozen = [p for p in backend.unet.parameters() if not p.requires_grad]
    assert all(p.dtype == half for p in frozen)
    x, t, cond = inputs(reference)
    out = backend.predict_eps(x, t, backend.encode_prompts(["a red apple", "a blue sky", ""]))
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in backend.trainable_parameters())
    with torch.no_grad():
        expected = reference.predict_eps(x, t, cond)
    assert (out.detach().float().cpu() - expected).abs().max() < 0.05 * expected.abs().max()
    images = backend.decode(torch.randn(2, 4, 8, 8))
    assert images.dtype == torch.float32 and images.device.type == "cpu"


def test_sampled_images_of_the_embedded_model_are_varied():
    """cpu-smoke sampling (8 steps, cfg 3, 8 trajectories) through the engine's sampler: images
    must not be constant, saturated or identical, and the prompt must matter."""
    from comfyui_prdp.rewards import create_reward
    from comfyui_prdp.sampling import sample_trajectories

    config = preset("cpu-smoke")
    backend = make_backend()
    prompts = ["a red apple"] * 4 + ["a city at night"] * 4
    cond, uncond = backend.encode_prompts(prompts), backend.encode_prompts([""] * 8)
    run = dict(steps=config.steps, cfg=config.cfg, eta=config.eta,
               latent_shape=backend.latent_shape(config.height, config.width))
    trajectories = sample_trajectories(backend, cond, uncond, generator=torch.Generator().manual_seed(0), **run)
    images = backend.decode(trajectories.final)
    assert torch.isfinite(trajectories.logp).all()
    assert 0.2 < images.mean() < 0.8
    assert images.flatten(1).std(dim=1).min() > 0.05
    assert ((images < 0.01) | (images > 0.99)).float().mean() < 0.2
    assert (images[0] - images[1]).abs().mean() > 0.02            # seeds differ
    same_noise = sample_trajectories(backend, backend.encode_prompts(["a city at night"] * 8), uncond,
                                     generator=torch.Generator().manual_seed(0), **run)
    assert (backend.decode(same_noise.final)[0] - images[0]).abs().mean() > 1e-3   # prompts matter
    sizes = create_reward("jpeg-incompressibility").score(images, prompts)
    assert sizes.std() > 0   # the JPEG reward separates images of one batch
