"""The diffusers flow backends (SD3 / Flux.1) on tiny transformers built from configs (random
weights, tiny CLIP / T5 encoders behind the offline CLIP tokenizer):
- the schedule equals the sigmas the real pipeline runs and the shift formulas written out
  here, for SD3's static shift and Flux's resolution-dependent (dynamic) shift;
- the velocity reaches the transformer as the pipelines feed it (Flux: packed latents, ids,
  guidance; SD3: 1000 sigma, padded CLIP + T5 context, pooled CLIP-L + CLIP-G);
- a short run is on-policy and changes the samples; the two-pass gradient equals autograd of
  the literal PRDP loss over flow-SDE log-densities of test_flow_update_exactness;
- exported LoRAs load with diffusers' load_lora_weights (no unexpected key, the same output)
  and with ComfyUI's LoRA loader (zero keys not loaded) on ComfyUI's tiny SD3 / Flux models.
"""
import functools
import logging

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from comfyui_prdp.backends.diffusers_flow import (DiffusersFluxBackend, DiffusersSD3Backend,  # noqa: E402
                                                  FLOW_TARGETS)
from comfyui_prdp.config import TrainConfig  # noqa: E402
from comfyui_prdp.lora.files import lora_metadata, save_lora  # noqa: E402
from comfyui_prdp.policies import policy_for  # noqa: E402
from comfyui_prdp.sampling import index_cond, sample_trajectories  # noqa: E402
from comfyui_prdp.models.tokenizer_offline import offline_clip_tokenizer  # noqa: E402
from test_flow_update_exactness import literal_flow_logprob  # noqa: E402
from test_update_exactness import literal_prdp  # noqa: E402
from epoch_recorder import EpochRecorder  # noqa: E402
from toy_backend import BrightnessReward  # noqa: E402

CONFIG = TrainConfig(epochs=1, prompts_per_epoch=2, images_per_prompt=2, updates_per_epoch=1, steps=3, cfg=1.0,
                     beta=0.05, clip_range=0.05, learning_rate=0.05, lora_rank=2, width=16, height=16,
                     sample_batch_size=4, train_batch_size=4, seed=3, policy="flow_sde")
TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408,
            max_position_embeddings=77, projection_dim=32, hidden_act="gelu")
#: the layouts of tests/support/comfy_tiny_flow.py's ComfyUI models (Flux: hidden 64, one double and one
#: single block; SD3: depth 2, hidden 128), so ComfyUI's key map of those models names these modules
FLUX = dict(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))
SD3 = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
           joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64, out_channels=16,
           pos_embed_max_size=16)
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)


@functools.lru_cache(maxsize=1)
def tokenizer():
    """One offline CLIP tokenizer for every component here (building one takes seconds; it holds no state)."""
    return offline_clip_tokenizer()


def _vae():
    return diffusers.AutoencoderKL(block_out_channels=(32, 64), latent_channels=16, norm_num_groups=32,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False,
                                   use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159).eval()


def _t5(width=32):
    config = transformers.T5Config(d_model=width, d_ff=64, d_kv=16, num_heads=2, num_layers=1, vocab_size=49408,
                                   dropout_rate=0.0)
    return transformers.T5EncoderModel(config).eval()


def flux_components(seed=0, guidance_embeds=True):
    """FluxPipeline's components; the T5 tokenizer is the offline CLIP one (any ids suit a random T5)."""
    torch.manual_seed(seed)
    return dict(transformer=diffusers.FluxTransformer2DModel(guidance_embeds=guidance_embeds, **FLUX).eval(),
                vae=_vae(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
                text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)).eval(),
                text_encoder_2=_t5(), tokenizer=tokenizer(), tokenizer_2=tokenizer())


def sd3_components(seed=0, with_t5=False):
    torch.manual_seed(seed)
    clip = (lambda: transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TEXT)).eval())
    parts = dict(transformer=diffusers.SD3Transformer2DModel(**SD3).eval(), vae=_vae(),
                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=clip(),
                 text_encoder_2=clip(), tokenizer=tokenizer(), tokenizer_2=tokenizer(),
                 text_encoder_3=None, tokenizer_3=None)
    if with_t5:
        parts.update(text_encoder_3=_t5(width=SD3["joint_attention_dim"]), tokenizer_3=tokenizer())
    return parts


def make_backend(kind, seed=0, components=None, **config):
    config = CONFIG.replace(**config)
    if kind == "flux":
        return DiffusersFluxBackend(**(components or flux_components(seed)), config=config, device="cpu")
    return DiffusersSD3Backend(**(components or sd3_components(seed)), config=config, device="cpu")


def randomize_lora(backend, scale=0.2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in backend.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


def shifted(t, shift):
    return shift * t / (1 + (shift - 1) * t)


def exponential_shift(t, mu):
    return torch.exp(torch.tensor(mu, dtype=torch.float64)) / (torch.exp(torch.tensor(mu, dtype=torch.float64))
                                                               + (1 / t - 1))


def pipeline_sigmas(pipe_class, components, steps, height, width):
    """The sigmas the real pipeline sets on its scheduler when it generates at height x width."""
    pipe = pipe_class(**components)
    pipe.set_progress_bar_config(disable=True)
    extra = dict(max_sequence_length=77) if pipe_class is diffusers.FluxPipeline else {}
    with torch.no_grad():
        pipe("a cat", num_inference_steps=steps, height=height, width=width, output_type="latent",
             generator=torch.Generator().manual_seed(0), **extra)
    return pipe.scheduler.sigmas.double()


def test_the_schedule_is_the_pipelines_for_static_and_dynamic_shifts():
    steps = 4
    sd3 = make_backend("sd3")
    sigma_min = shifted(torch.tensor(1 / 1000, dtype=torch.float64), 3.0)   # the shifted training schedule's end
    expected = torch.cat([shifted(torch.linspace(1, float(sigma_min), steps, dtype=torch.float64), 3.0),
                          torch.zeros(1, dtype=torch.float64)])
    assert torch.allclose(sd3.flow_sigmas(steps), expected, atol=1e-6)
    assert torch.allclose(sd3.flow_sigmas(steps), pipeline_sigmas(diffusers.StableDiffusion3Pipeline,
                                                                  sd3_components(), steps, 16, 16), atol=1e-6)
    flux = make_backend("flux")
    by_size = {}
    for height, width in ((16, 16), (64, 32)):
        tokens = (height // 4) * (width // 4)          # VAE factor 2 here, 2x2 packing
        slope = (1.15 - 0.5) / (4096 - 256)
        mu = 0.5 + slope * (tokens - 256)
        t = torch.linspace(1, 1 / steps, steps, dtype=torch.float64)
        expected = torch.cat([exponential_shift(t, mu), torch.zeros(1, dtype=torch.float64)])
        got = flux.flow_sigmas(steps, height, width)
        assert torch.allclose(got, expected, atol=1e-6), (got, expected)
        assert torch.allclose(got, pipeline_sigmas(diffusers.FluxPipeline, flux_components(), steps, height, width),
                              atol=1e-6)
        by_size[height, width] = got
    assert (by_size[16, 16] - by_size[64, 32]).abs().max() > 1e-3        # the shift depends on the resolution
    assert torch.equal(flux.flow_sigmas(steps), by_size[16, 16])           # default: the training size


def test_flux_velocity_guidance_and_packing_reach_the_transformer():
    backend = make_backend("flux", flow_guidance=2.0)
    randomize_lora(backend)
    cond = backend.encode_prompts(["a cat", "a dog"])
    assert cond["context"].shape == (2, 77, 32) and cond["pooled_output"].shape == (2, 32)
    x = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([1.0, 0.4])
    with torch.no_grad():
        velocity = backend.predict(x, sigma, cond)
        tokens = x.view(2, 16, 4, 2, 6, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 24, 64)
        rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")
        img_ids = torch.stack([torch.zeros(24), rows.reshape(-1), cols.reshape(-1)], dim=1)
        raw = backend.transformer(hidden_states=tokens, encoder_hidden_states=cond["context"],
                                  pooled_projections=cond["pooled_output"], timestep=sigma, img_ids=img_ids,
                                  txt_ids=torch.zeros(77, 3), guidance=torch.full((2,), 2.0)).sample
    expected = raw.view(2, 4, 6, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 16, 8, 12)
    assert torch.allclose(velocity, expected, atol=1e-6)
    backend.guidance = 5.0
    with torch.no_grad():
        assert (backend.predict(x, sigma, cond) - velocity).abs().max() > 1e-4, "guidance does not reach Flux-dev"
    assert backend.lora_info()["family"].name == "Flux.1-dev"
    schnell = make_backend("flux", components=flux_components(guidance_embeds=False), flow_guidance=2.0)
    assert schnell.guidance is None and schnell.lora_info()["family"].name == "Flux.1-schnell"
    with torch.no_grad():
        schnell.text_encoders[1].shared.weight[:] = float("nan")          # a damaged (or overflowing) T5
    with pytest.raises(ValueError, match="text encoders gave NaN / inf in context"):
        schnell.encode_prompts(["a cat"])


def test_sd3_context_pooled_and_timestep_reach_the_transformer():
    backend = make_backend("sd3", components=sd3_components(with_t5=True))
    cond = backend.encode_prompts(["a cat"])
    ids = backend.tokenizers[0](["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        l_out, g_out = (encoder(ids, output_hidden_states=True) for encoder in backend.text_encoders[:2])
        t5_hidden = backend.text_encoders[2](ids)[0]
    clip = torch.cat([l_out.hidden_states[-2], g_out.hidden_states[-2]], -1)            # 64 = joint width
    assert torch.allclose(cond["context"][:, :77], clip)
    assert torch.allclose(cond["context"][:, 77:], t5_hidden)
    assert torch.allclose(cond["pooled_output"], torch.cat([l_out.text_embeds, g_out.text_embeds], -1))
    no_t5 = make_backend("sd3").encode_prompts(["a cat"])
    assert no_t5["context"].shape == (1, 154, 64) and not no_t5["context"][:, 77:].any()
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        velocity = backend.predict(x, torch.tensor([0.25]), cond)
        raw = backend.transformer(hidden_states=x, encoder_hidden_states=cond["context"],
                                  pooled_projections=cond["pooled_output"], timestep=torch.tensor([250.0])).sample
    assert torch.allclose(velocity, raw, atol=1e-6)
    assert set(backend.lora_info()["targets"]) == set(FLOW_TARGETS)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_a_short_run_is_on_policy_and_changes_the_samples(kind):
    from comfyui_prdp.trainer import Trainer

    config = dict(cfg=2.0) if kind == "sd3" else dict(flow_guidance=3.5)
    backend = make_backend(kind, **config)
    cfg = CONFIG.replace(epochs=2, **config)
    cond = backend.encode_prompts(["a cat", "a dog"])
    uncond = backend.encode_prompts(["", ""])

    def samples():
        return sample_trajectories(backend, cond, uncond, steps=cfg.steps, cfg=cfg.cfg, latent_shape=(16, 8, 8),
                                   generator=torch.Generator().manual_seed(9), policy=policy_for(cfg, backend)).final

    before = samples()
    result = Trainer(backend, BrightnessReward(), ["a cat", "a dog"], cfg).run()
    assert [m["onpolicy_max_diff"] < 1e-5 for m in result.metrics] == [True, True], result.metrics
    assert (samples() - before).abs().max() > 1e-4


class VelocityAsDenoiser:
    """The backend as literal_flow_logprob calls it: denoised(x, sigma, {"context": row ids}) =
    x - sigma v, with the rows' conditioning looked up in `table` (cond rows, then uncond rows)."""

    def __init__(self, backend, table):
        self.backend, self.table = backend, table

    def denoised(self, x, sigma, cond):
        rows = index_cond(self.table, cond["context"].long())
        velocity = self.backend.predict(x, sigma.float(), rows).double()
        return x.double() - sigma.view(-1, 1, 1, 1) * velocity


def test_the_two_pass_gradient_equals_autograd_of_the_literal_loss():
    from comfyui_prdp.trainer import Trainer

    cfg = CONFIG.replace(cfg=2.0, beta=0.5, train_batch_size=3, steps=3)
    backend = make_backend("sd3", cfg=2.0)
    randomize_lora(backend, scale=0.1)
    trainer = Trainer(backend, BrightnessReward(), ["a cat", "a dog"], cfg)
    params = backend.trainable_parameters()
    recorded = EpochRecorder(trainer)
    start = [p.detach().clone() for p in params]
    trainer.train_epoch(0)
    grads, batch = recorded.grads, recorded.batch
    assert len(grads) == 1
    with torch.no_grad():
        for p, value in zip(params, start):
            p.copy_(value)
    n = batch.traj.latents.shape[0]
    model = VelocityAsDenoiser(backend, {k: torch.cat([batch.cond[k], batch.uncond[k]]) for k in batch.cond})
    sigmas = backend.flow_sigmas(cfg.steps)
    context, uncontext = torch.arange(n).float(), torch.arange(n, 2 * n).float()
    lat = batch.traj.latents

    def logp(grad):
        with torch.set_grad_enabled(grad):
            return torch.stack([literal_flow_logprob(model, lat[:, s], lat[:, s + 1], float(sigmas[s]),
                                                     float(sigmas[s + 1]), float(sigmas[1]), context, uncontext,
                                                     cfg.cfg, cfg.flow_noise_level, "sde")
                                for s in range(cfg.steps - 1)], dim=1)

    with torch.no_grad():
        logp_old = logp(False)
        with backend.adapters_disabled():
            logp_ref = logp(False)
    assert torch.allclose(batch.traj.logp, logp_old, atol=1e-5)
    N, B, T = cfg.prompts_per_epoch, cfg.images_per_prompt, cfg.steps - 1
    loss = literal_prdp(logp(True).view(N, B, T), logp_old.view(N, B, T), logp_ref.view(N, B, T),
                        batch.rewards.double().view(N, B), cfg.beta, cfg.clip_range, cfg.step_reduce)
    expected = torch.autograd.grad(loss, params)
    got, want = (torch.cat([g.flatten() for g in gs]).double() for gs in (grads[0], expected))
    assert want.abs().max() > 0                 # a test of zeros would prove nothing
    # float32 transformer evaluations in other micro-batches: agreement to float32 rounding
    assert (got - want).norm() / want.norm() < 1e-4, ((got - want).norm() / want.norm()).item()
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())


def _diffusers_warnings(function):
    capture = []
    handler = logging.Handler()
    handler.emit = lambda record: capture.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        function()
    finally:
        logger.removeHandler(handler)
    return capture


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_exported_lora_loads_with_load_lora_weights_with_the_same_output(kind, tmp_path):
    backend = make_backend(kind, lora_alpha=6.0)              # scale 3: folded into lora_B in the file
    randomize_lora(backend)
    metadata = lora_metadata(backend_config := CONFIG.replace(lora_alpha=6.0), backend, "test", 1, 2)
    assert metadata["ss_base_model_version"] == ("sd3" if kind == "sd3" else "flux1")
    assert metadata["ss_network_alpha"] == "2.0" and backend_config.lora_rank == 2
    path = save_lora(tmp_path / f"{kind}.safetensors", backend.lora_state_dict(), metadata)
    cond = backend.encode_prompts(["a cat"])
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        trained = backend.predict(x, sigma, cond)
        with backend.adapters_disabled():
            base = backend.predict(x, sigma, cond)
    assert (trained - base).abs().max() > 1e-3
    if kind == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(**sd3_components())         # same seed: the same base weights
    else:
        pipe = diffusers.FluxPipeline(**flux_components())
    messages = _diffusers_warnings(lambda: pipe.load_lora_weights(str(path)))
    assert not [m for m in messages if "unexpected keys" in m.lower() or "missing keys" in m.lower()], messages
    plain = make_backend(kind, components=dict(flux_components() if kind == "flux" else sd3_components(),
                                               transformer=pipe.transformer.requires_grad_(False)))
    with torch.no_grad(), plain.adapters_disabled():       # the PRDP adapter of `plain` off: the loaded LoRA only
        loaded = plain.predict(x, sigma, cond)
    assert torch.allclose(loaded, trained, atol=1e-5), (loaded - trained).abs().max()
    again = make_backend(kind, lora_alpha=6.0)
    again.load_lora_state_dict(backend.lora_state_dict())          # resume: the same adapter
    with torch.no_grad():
        assert torch.allclose(again.predict(x, sigma, cond), trained, atol=1e-6)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_exported_lora_loads_through_comfyuis_lora_loader_with_no_key_left(kind):
    from comfy_inprocess import import_comfy, lora_through_comfyui

    import_comfy()
    from comfy_tiny_flow import tiny_flow_family

    backend = make_backend(kind, lora_alpha=6.0)             # scale 3, folded into the file's lora_B
    randomize_lora(backend)
    lora = backend.lora_state_dict()
    model = tiny_flow_family(kind).model
    patched, not_loaded = lora_through_comfyui(model, lora)
    assert not_loaded == []
    # what ComfyUI adds to each of its weights == the trained deltas scale * B @ A placed by ComfyUI's own
    # key map (Flux / SD3 fuse q, k, v into one qkv weight: each lands in its slice, none is dropped)
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = model.model.state_dict()
    expected = {}
    for module_name, layer in backend._lora_layers.items():
        target = key_map["transformer." + module_name]
        key, (dim, offset, size) = target if isinstance(target, tuple) else (target, (0, 0, None))
        delta = expected.setdefault(key, torch.zeros_like(weights[key], dtype=torch.float32))
        part = delta if size is None else delta.narrow(dim, offset, size)
        lora_a, lora_b = layer.lora_A["prdp"].weight, layer.lora_B["prdp"].weight
        part += float(layer.scaling["prdp"]) * (lora_b @ lora_a).detach()
    assert set(patched.patches) == set(expected)
    for key, delta in expected.items():
        applied = comfy.lora.calculate_weight(patched.patches[key], torch.zeros_like(delta), key)
        assert torch.allclose(applied, delta, atol=1e-6), key
    assert any(isinstance(key_map["transformer." + m], tuple) for m in backend._lora_layers)   # fused qkv met
    _, control = lora_through_comfyui(model, dict(lora, **{"transformer.nowhere.to_q.lora_A.weight": torch.zeros(2, 64),
                                                           "transformer.nowhere.to_q.lora_B.weight": torch.zeros(64, 2)}))
    assert len(control) >= 1            # the check can fail: a key ComfyUI does not know is reported


@pytest.mark.parametrize("kind, with_t5", [("sd3", True), ("sd3", False), ("flux", True)],
                         ids=["sd3", "sd3-without-t5", "flux"])
def test_a_saved_flow_pipeline_folder_loads_as_its_backend(kind, with_t5, tmp_path):
    from comfyui_prdp.models.loading import load_backend

    if kind == "sd3":
        pipe, backend_class = diffusers.StableDiffusion3Pipeline(**sd3_components(with_t5=with_t5)), DiffusersSD3Backend
    else:
        pipe, backend_class = diffusers.FluxPipeline(**flux_components()), DiffusersFluxBackend
    pipe.save_pretrained(tmp_path / kind)
    loaded = load_backend(str(tmp_path / kind), CONFIG, device="cpu")
    assert type(loaded) is backend_class and loaded.model_name == kind
    reference = make_backend(kind, components=sd3_components(with_t5=with_t5) if kind == "sd3" else None)
    cond = reference.encode_prompts(["a cat"])
    assert torch.allclose(loaded.encode_prompts(["a cat"])["context"], cond["context"])
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.allclose(loaded.predict(x, torch.tensor([0.5]), cond), reference.predict(x, torch.tensor([0.5]), cond),
                              atol=1e-6)
    assert torch.allclose(loaded.flow_sigmas(4), reference.flow_sigmas(4))


@pytest.mark.parametrize("keys, model_type", [
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (4,), "guidance_in.in_layer.bias": (4,),
      "img_in.weight": (4, 64)}, "flux-dev"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (4,)}, "flux-schnell"),
])
def test_a_single_file_flow_checkpoint_is_refused_with_what_to_pass(keys, model_type, tmp_path):
    from safetensors.torch import save_file

    from comfyui_prdp.models.loading import ModelLoadError, check_model_folders, load_backend

    path = tmp_path / "flux1.safetensors"
    save_file({key: torch.zeros(shape) for key, shape in keys.items()}, str(path))
    for attempt in (lambda: check_model_folders(str(path)), lambda: load_backend(str(path), CONFIG),
                    lambda: load_backend(str(path), CONFIG, base_config=str(tmp_path / "missing"))):
        with pytest.raises((ModelLoadError, FileNotFoundError)) as error:
            attempt()
        message = str(error.value)
        assert "\n" not in message
    with pytest.raises(ModelLoadError, match=f"single-file '{model_type}' checkpoint.*local diffusers folder"):
        load_backend(str(path), CONFIG)


def test_other_transformer_pipelines_are_refused(tmp_path):
    import json

    from comfyui_prdp.models.loading import ModelLoadError, load_backend

    diffusers.FluxPipeline(**flux_components()).save_pretrained(tmp_path / "flux")
    index_file = tmp_path / "flux" / "model_index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps(dict(index, _class_name="QwenImagePipeline")))
    with pytest.raises(ModelLoadError, match="runs UNet models .* StableDiffusion3Pipeline and FluxPipeline"):
        load_backend(str(tmp_path / "flux"), CONFIG)
    index.pop("text_encoder_2")
    index_file.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="lacks the component.s. text_encoder_2 a FluxPipeline"):
        load_backend(str(tmp_path / "flux"), CONFIG)


def test_the_cli_trains_a_flux_folder_and_refuses_the_ddpm_policy_on_it(tmp_path, capsys):
    from comfyui_prdp import cli
    from comfyui_prdp.lora.files import load_lora

    diffusers.FluxPipeline(**flux_components()).save_pretrained(tmp_path / "flux")
    flags = ["--base", str(tmp_path / "flux"), "--preset", "consumer-gpu-flux", "--device", "cpu", "--width", "16",
             "--height", "16", "--steps", "3", "--epochs", "1", "--images-per-prompt", "2", "--prompts-per-epoch", "1",
             "--sample-batch-size", "2", "--lora-rank", "2", "--mixed-precision", "no", "--flow-guidance", "2.5",
             "--no-eval"]
    assert cli.main(["train", "--out", str(tmp_path / "ddpm"), *flags, "--policy", "ddpm"]) != 0
    assert "error: policy 'ddpm' needs a variance-preserving" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path / "run"), *flags]) == 0
    state, metadata = load_lora(tmp_path / "run" / "lora.safetensors")
    assert metadata["base_family"] == "Flux.1-dev" and metadata["ss_base_model_version"] == "flux1"
    assert all(key.startswith("transformer.") and ".lora_" in key for key in state)
    assert any(value.abs().max() > 0 for key, value in state.items() if "lora_B" in key)
    assert '"flow_guidance": 2.5' in metadata["hyperparameters"]


def test_a_cached_hub_id_of_a_flux_pipeline_loads_and_an_uncached_one_is_refused(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from comfyui_prdp.models.loading import ModelLoadError, load_backend
    from test_model_loading import put_in_hf_cache

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_backend("someone/tiny-flux", CONFIG, device="cpu")
    diffusers.FluxPipeline(**flux_components()).save_pretrained(tmp_path / "flux")
    put_in_hf_cache(cache, "someone/tiny-flux", tmp_path / "flux")
    backend = load_backend("someone/tiny-flux", CONFIG, device="cpu")
    assert type(backend) is DiffusersFluxBackend and backend.model_name == "someone/tiny-flux"
