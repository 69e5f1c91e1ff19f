"""ComfyBackend on a real (tiny, random-weight) ComfyUI SD1.5 model, in-process on the CPU.

Checks the Backend contract: the VP schedule, predict_eps against the formulas (eps and
v-prediction), the LoRA switch, gradients from a fresh thread, the user's MODEL left as it
was, and the exported LoRA loading through ComfyUI's LoRA loader with every key matched and
the same effect as the trained adapters.
"""
import logging

import pytest
import torch

from comfy_inprocess import LogCapture, comfy_dirs, import_comfy, in_thread  # noqa: F401  (comfy_dirs: a fixture)

import_comfy()

import comfy.model_management  # noqa: E402
import comfy.model_sampling  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

from comfyui_prdp.backends.comfyui.backend import ComfyBackend  # noqa: E402
from comfyui_prdp.backends.comfyui.adapters import identity_weight  # noqa: E402
from comfyui_prdp.lora.files import load_lora, save_lora  # noqa: E402

HW = 64
#: 4 transformer blocks in the tiny UNet (input, middle, 2 output) x attn1/attn2 x to_q/k/v/out.0
ADAPTERS = 32


def make_backend(sd15, **kwargs):
    model, clip, vae = sd15
    with torch.inference_mode():      # the node builds it in ComfyUI's worker thread
        return ComfyBackend(model, clip, vae, **{"rank": 2, "seed": 0, **kwargs})


def randomize_lora(backend, scale=0.05, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in backend.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


def unet_output(patcher, x_vp, t, context):
    """The raw UNet output of a patcher (loaded the ComfyUI way)."""
    comfy.model_management.load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.diffusion_model(x_vp, t.float(), context=context).float()


def test_schedule_is_sd15_scaled_linear(sd15):
    backend = make_backend(sd15)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, dim=0)
    assert backend.alphas_cumprod.dtype == torch.float64 and backend.alphas_cumprod.shape == (1000,)
    assert torch.allclose(backend.alphas_cumprod, expected, rtol=1e-5, atol=1e-7)
    assert tuple(backend.latent_shape(HW, HW)) == (4, HW // 8, HW // 8)


def test_predict_eps_of_an_eps_model_is_the_unet_output(sd15):
    backend = make_backend(sd15)
    cond = in_thread(lambda: backend.encode_prompts(["a cat", "a dog"]))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 10])
    eps = in_thread(lambda: backend.predict_eps(x, t, cond).detach())
    # the LoRA starts at zero (up @ down = 0), so the UNet output is the base eps prediction
    expected = unet_output(backend.patcher, x, t, cond["context"])
    assert eps.shape == x.shape
    assert torch.allclose(eps, expected, atol=2e-4), (eps - expected).abs().max()
    assert expected.abs().mean() > 0.01   # not trivially zero


def test_predict_eps_of_a_v_prediction_model_converts_v(sd15):
    model, clip, vae = sd15

    class VPredictionSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
        pass

    v_model = model.clone()       # what core "ModelSamplingDiscrete (v_prediction)" does
    v_model.add_object_patch("model_sampling", VPredictionSampling(model.model.model_config))
    backend = make_backend((v_model, clip, vae))
    cond = in_thread(lambda: backend.encode_prompts(["a cat", "a dog"]))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700, 50])
    eps = in_thread(lambda: backend.predict_eps(x, t, cond).detach())
    v = unet_output(backend.patcher, x, t, cond["context"])
    a = backend.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    expected = (1 - a).sqrt() * x + a.sqrt() * v          # eps from v-prediction, VP form
    assert torch.allclose(eps, expected, atol=2e-4), (eps - expected).abs().max()


def test_adapters_switch_the_lora_on_and_off(sd15):
    model, clip, vae = sd15
    backend = make_backend(sd15)
    cond = in_thread(lambda: backend.encode_prompts(["a cat"]))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500])
    base = in_thread(lambda: backend.predict_eps(x, t, cond).detach())
    randomize_lora(backend)

    def both():
        with torch.no_grad():
            on = backend.predict_eps(x, t, cond)
            with backend.adapters_disabled():
                off = backend.predict_eps(x, t, cond)
            again = backend.predict_eps(x, t, cond)
        return on, off, again

    on, off, again = in_thread(both)
    assert (on - off).abs().max() > 1e-3, "the LoRA has no effect"
    assert torch.equal(off, base), "with adapters disabled the output must be the base model's"
    assert torch.equal(on, again), "the switch must turn back on"
    assert backend.switch.enabled


def test_a_lora_applied_upstream_stays_in_the_base_model(sd15):
    """MODEL -> LoraLoader -> PRDP: the base of the log-ratio includes the user's LoRA."""
    model, clip, vae = sd15
    donor = make_backend(sd15)
    randomize_lora(donor, seed=21)
    with torch.inference_mode():
        upstream, _ = comfy.sd.load_lora_for_models(model, None, donor.lora_state_dict(), 1.0, 0)
    backend = make_backend((upstream, clip, vae))
    randomize_lora(backend, seed=22)
    cond = in_thread(lambda: backend.encode_prompts(["a cat"]))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(23))
    t = torch.tensor([450])

    def off_and_on():
        with torch.no_grad(), backend.adapters_disabled():
            off = backend.predict_eps(x, t, cond)
        with torch.no_grad():
            on = backend.predict_eps(x, t, cond)
        return off, on

    off, on = in_thread(off_and_on)
    with_user_lora = unet_output(upstream, x, t, cond["context"])
    plain = unet_output(model, x, t, cond["context"])
    assert (with_user_lora - plain).abs().max() > 1e-3
    assert torch.allclose(off, with_user_lora, atol=2e-4), (off - with_user_lora).abs().max()
    assert (on - off).abs().max() > 1e-3


def test_gradients_reach_every_lora_factor_from_a_fresh_thread(sd15):
    backend = make_backend(sd15)
    cond = in_thread(lambda: backend.encode_prompts(["a cat", "a dog"]))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([800, 200])

    def step():
        assert not torch.is_inference_mode_enabled()
        eps = backend.predict_eps(x, t, cond)
        eps.pow(2).mean().backward()
        return [p.grad for p in backend.trainable_parameters()]

    grads = in_thread(step)
    ups, downs = grads[0::2], grads[1::2]
    assert len(downs) == len(backend.adapters) == ADAPTERS
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in downs), "a lora_down got no gradient"
    # lora_down starts at zero, so lora_up gradients are exactly zero on the first step
    assert all(g.abs().sum() == 0 for g in ups)
    base_grads = [n for n, p in backend.patcher.model.diffusion_model.named_parameters() if p.grad is not None]
    assert base_grads == [], "base weights (shared with the user's MODEL) received gradients"


def test_gradient_checkpointing_gives_the_same_gradients_and_is_removed_on_release(sd15):
    model, clip, vae = sd15
    unet = model.model.diffusion_model
    cond = in_thread(lambda: make_backend(sd15).encode_prompts(["a cat"]))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([300])
    grads = {}
    for checkpointing in (False, True):
        backend = make_backend(sd15, gradient_checkpointing=checkpointing)
        randomize_lora(backend, seed=5)

        def step():
            backend.prepare_for_training()
            backend.predict_eps(x, t, cond).pow(2).mean().backward()
            return [p.grad.clone() for p in backend.trainable_parameters()]

        grads[checkpointing] = in_thread(step)
        patched = [m for m in unet.modules() if "forward" in m.__dict__]
        assert bool(patched) == checkpointing
        backend.release()
        assert not [m for m in unet.modules() if "forward" in m.__dict__], "checkpointing left on the user's UNet"
    for plain, checkpointed in zip(grads[False], grads[True]):
        assert torch.allclose(plain, checkpointed, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads[True])


def test_the_users_model_is_left_untouched(sd15):
    model, clip, vae = sd15
    cond = None
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([400])
    patches_before = dict(model.patches)
    weights_before = {k: v.clone() for k, v in list(model.model.diffusion_model.state_dict().items())[:40]}

    backend = make_backend(sd15)
    cond = in_thread(lambda: backend.encode_prompts(["a horse"]))
    before = unet_output(model, x, t, cond["context"])
    randomize_lora(backend)

    def train_step():
        backend.prepare_for_training()
        backend.predict_eps(x, t, cond).pow(2).mean().backward()

    in_thread(train_step)
    backend.release()
    after = unet_output(model, x, t, cond["context"])
    assert torch.equal(before, after), "the user's model computes something else after training"
    assert model.weight_wrapper_patches == {} and model.patches == patches_before
    for key, value in weights_before.items():
        assert torch.equal(model.model.diffusion_model.state_dict()[key], value), key
    leftovers = [f for m in model.model.diffusion_model.modules()
                 for f in getattr(m, "weight_function", []) + getattr(m, "bias_function", [])
                 if f is identity_weight or hasattr(f, "switch")]
    assert leftovers == [], "release() left the backend's weight wrappers on the shared modules"


def test_exported_lora_loads_in_comfyui_with_every_key_matched_and_the_same_effect(sd15, tmp_path):
    model, clip, vae = sd15
    backend = make_backend(sd15)
    randomize_lora(backend, scale=0.05)
    cond = in_thread(lambda: backend.encode_prompts(["a cat"]))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([600])
    trained = in_thread(lambda: backend.predict_eps(x, t, cond).detach())

    state = backend.lora_state_dict()
    assert len(state) == 3 * len(backend.adapters)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    assert "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha" in state
    path = save_lora(tmp_path / "trained.safetensors", state, {"format": "test"})
    loaded, _ = load_lora(path)

    capture = LogCapture()
    logging.getLogger().addHandler(capture)
    try:
        for lora in (comfy.utils.load_torch_file(str(path)), backend.lora_model()):  # file (LoraLoader), LORA_MODEL
            capture.messages.clear()
            with torch.inference_mode():
                patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
            assert not [m for m in capture.messages if "lora key not loaded" in m], capture.messages
            assert len(patched.patches) == len(backend.adapters)
            base_x = x * (1 + backend._sigmas[t] ** 2).sqrt()
            comfy.model_management.load_models_gpu([patched])
            with torch.no_grad():
                eps = patched.model.diffusion_model(x, t.float(), context=cond["context"]).float()
            assert torch.allclose(eps, trained, atol=1e-3), (eps - trained).abs().max()
            assert base_x is not None
    finally:
        logging.getLogger().removeHandler(capture)
    assert set(loaded) == set(state)


def test_exported_lora_loads_in_diffusers_with_the_same_effect(sd15):
    """The same UNet as a diffusers model (weights mapped with ComfyUI's own table), the LoRA
    file loaded through diffusers' kohya reader: identical output."""
    diffusers = pytest.importorskip("diffusers")
    model, clip, vae = sd15
    backend = make_backend(sd15)
    randomize_lora(backend, scale=0.05, seed=11)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(320, 320), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=768, attention_head_dim=8)
    comfy.model_management.load_models_gpu([model])   # undo weight patches other models left in place
    ldm = model.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    unet.load_state_dict({d: ldm[k].detach().float().clone() for d, k in mapping.items() if k in ldm}, strict=True)
    lora, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(backend.lora_state_dict())
    assert len(lora) == 2 * ADAPTERS and all(".processor." in k for k in lora)   # every module understood
    diffusers.StableDiffusionPipeline.load_lora_into_unet(lora, alphas, unet)
    generator = torch.Generator().manual_seed(12)
    x, context, t = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 768, generator=generator), torch.tensor([500])
    with torch.no_grad():
        with_lora = unet(x, t, encoder_hidden_states=context).sample
        unet.disable_adapters()
        without = unet(x, t, encoder_hidden_states=context).sample
    ours = in_thread(lambda: backend.predict_eps(x, t, {"context": context}).detach())
    assert (with_lora - without).abs().max() > 1e-3, "the LoRA had no effect in diffusers"
    assert torch.allclose(with_lora, ours, atol=1e-4), (with_lora - ours).abs().max()


def test_lora_state_dict_round_trip_restores_the_same_model(sd15):
    first = make_backend(sd15, seed=0)
    randomize_lora(first, seed=7)
    state = first.lora_state_dict()
    second = make_backend(sd15, seed=123)
    second.load_lora_state_dict(state)
    for a, b in zip(first.trainable_parameters(), second.trainable_parameters()):
        assert torch.equal(a, b)
    second.load_lora_state_dict(first.lora_model())    # LORA_MODEL keys are read too
    bad = dict(state)
    bad["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="match no trained module"):
        second.load_lora_state_dict(bad)
    third = make_backend(sd15, rank=3)
    with pytest.raises(ValueError, match="lora_rank"):
        third.load_lora_state_dict(state)


def test_prompts_of_different_lengths_batch_and_decode_gives_images(sd15):
    backend = make_backend(sd15)
    long_prompt = " ".join(["a very detailed photo of a cat"] * 20)    # > 75 tokens: 154-token conditioning
    cond = in_thread(lambda: backend.encode_prompts(["a cat", long_prompt]))
    assert cond["context"].shape == (2, 154, 768)
    assert not cond["context"].is_inference()
    single = in_thread(lambda: backend.encode_prompts(["a cat"]))
    assert torch.equal(cond["context"][0, :77], single["context"][0])
    assert torch.equal(cond["context"][0, 77:], single["context"][0])   # repeated, as ComfyUI batches it
    images = in_thread(lambda: backend.decode(torch.randn(2, 4, 8, 8)))
    assert images.shape == (2, HW, HW, 3) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0


def test_training_compute_dtype_policy():
    from comfyui_prdp.backends.comfyui.memory import training_compute_dtype

    assert training_compute_dtype("fp16", "cpu", False) is None          # the CPU keeps ComfyUI's fp32
    assert training_compute_dtype("fp16", "cuda", True) == torch.bfloat16
    assert training_compute_dtype("fp16", "cuda", False) == torch.float16
    assert training_compute_dtype("no", "cuda", True) == torch.float32
    with pytest.raises(ValueError, match="mixed_precision"):
        training_compute_dtype("fp8", "cuda", True)


def test_refuses_a_missing_clip_or_vae(sd15):
    model, clip, vae = sd15
    with pytest.raises(ValueError, match="clip is None"):
        ComfyBackend(model, None, vae)
    with pytest.raises(ValueError, match="vae is None"):
        ComfyBackend(model, clip, None)


# --- the train node, in-process (ComfyUI's worker thread is this test's thread) ------------------
TINY_TRAINING = dict(prompts="a cat\na dog", negative_prompt="", preset="cpu-smoke", epochs=1, prompts_per_epoch=2,
                     images_per_prompt=2, steps=2, cfg=3.0, beta=0.1, clip_range=0.01, updates_per_epoch=1,
                     learning_rate=3e-3, lora_rank=2, width=64, height=64, seed=3)



@pytest.fixture(scope="module")
def plugin():
    from comfy_inprocess import load_plugin_package

    return load_plugin_package()


def run_train_node(plugin, sd15, **settings):
    model, clip, vae = sd15
    nodes = plugin.NODE_CLASS_MAPPINGS
    with torch.inference_mode():       # as ComfyUI's worker thread runs every node
        reward, = nodes["PRDPLoadRewardModel"]().load("jpeg-incompressibility", "(auto)", "cpu", "auto")
        return nodes["PRDPTrainLoRA"]().train(model, clip, vae, reward, **{**TINY_TRAINING, **settings},
                                             unique_id="7")


def test_train_node_saves_a_kohya_lora_and_returns_the_patched_model(plugin, sd15, comfy_dirs):
    model, clip, vae = sd15
    out = run_train_node(plugin, sd15, lora_name="inproc", checkpoint_every=1)
    model_out, lora, curve = out["result"]
    path = comfy_dirs / "loras" / "prdp" / "inproc.safetensors"
    state, metadata = load_lora(path)
    assert len(state) == 3 * ADAPTERS and all(k.startswith("lora_unet_") for k in state)
    assert metadata["format"] == "comfyui-prdp" and metadata["epochs"] == "1"
    assert set(lora) == {k for k in lora if k.startswith("diffusion_model.")} and len(lora) == 3 * ADAPTERS
    assert "prdp/inproc.safetensors" in out["ui"]["text"][0]
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and curve.min() >= 0 and curve.max() <= 1
    assert len(model_out.patches) == ADAPTERS and model.weight_wrapper_patches == {} and model.patches == {}
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(10))
    t = torch.tensor([500])
    assert (unet_output(model_out, x, t, context) - unet_output(model, x, t, context)).abs().max() > 1e-5
    checkpoints = list((comfy_dirs / "output" / "prdp_runs").glob("inproc/checkpoints/epoch_00001/lora.safetensors"))
    assert checkpoints, "checkpoint_every=1 wrote no checkpoint"
    run_train_node(plugin, sd15, lora_name="inproc", epochs=1)
    assert (comfy_dirs / "loras" / "prdp" / "inproc_00001.safetensors").is_file(), "a second run must not overwrite"
    assert load_lora(path)[0].keys() == state.keys()


def test_resume_continues_from_a_checkpoint(plugin, sd15, comfy_dirs):
    run_train_node(plugin, sd15, lora_name="resumable", checkpoint_every=1, epochs=1)
    train_cls = plugin.NODE_CLASS_MAPPINGS["PRDPTrainLoRA"]
    choices = train_cls.INPUT_TYPES()["optional"]["resume_from"][0]
    assert "resumable/checkpoints/epoch_00001" in choices
    out = run_train_node(plugin, sd15, lora_name="resumed", epochs=2, resume_from="resumable/checkpoints/epoch_00001")
    assert "finished: 2 of 2 epochs" in out["ui"]["text"][0]
    lines = (comfy_dirs / "output" / "prdp_runs" / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2       # epoch 1 from the checkpoint, epoch 2 trained now


def test_cancel_ends_the_node_interrupted_within_seconds_and_keeps_a_checkpoint(plugin, sd15, comfy_dirs):
    import time

    events = []

    def hook(value, total, preview, prompt_id=None, node_id=None):   # what main.py installs
        comfy.model_management.throw_exception_if_processing_interrupted()
        events.append((value, preview is not None))
        if preview is not None and not comfy.model_management.processing_interrupted():
            comfy.model_management.interrupt_current_processing(True)     # the user presses Cancel
            events.append("cancel")
            timing["cancel"] = time.monotonic()

    timing = {}
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_train_node(plugin, sd15, lora_name="cancelled", epochs=50)
        stopped_after = time.monotonic() - timing["cancel"]
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert "cancel" in events
    assert stopped_after < 30, f"the node took {stopped_after:.1f} s to stop"
    found = list((comfy_dirs / "output" / "prdp_runs").glob("cancelled/checkpoints/epoch_*_stopped"))
    assert found, "no checkpoint after Cancel"
    state, _ = load_lora(found[0] / "lora.safetensors")
    assert len(state) == 3 * ADAPTERS
    job = [j for j in plugin.comfyui_prdp.service.jobs.JOBS.jobs() if j.name == "cancelled"][-1]
    assert job.status == "stopped" and 1 <= len(job.metrics) < 50
