"""ComfyBackend on tiny Flux, SD3 and Qwen-Image models built through ComfyUI's own classes
(tests/support/comfy_tiny_flow.py), in-process on the CPU: flow models sampled with the flow-SDE policy;
Chroma (conditioned with `pooled_output: None`) and Lumina2 train too, HiDream is refused.

What each test pins down:
- the model sampling is read by type (CONST + ModelSamplingFlux / ModelSamplingDiscreteFlow) and
  the LoRA goes on each architecture's ComfyUI module names (Flux double/single blocks, SD3
  joint blocks);
- the schedule is the model's own (SD3 shift 3.0, Flux 1.15, and what ComfyUI's ModelSamplingSD3
  / ModelSamplingFlux nodes set), written out here, stepped as ComfyUI's "simple" scheduler
  (other step counts: test_comfy_model_sampling.py);
- predict is ComfyUI's denoised x0 for the latent as given (no VP input rescaling), checked
  against the diffusion model's raw velocity output, with the pooled vector and (Flux) the
  guidance value as conditioning, as FluxGuidance sets it;
- the trainer's on-policy check < 1e-5, a short run changes the samples, the user's MODEL keeps
  its weights and gets no wrapper, and the exported LoRA loads through ComfyUI's LoRA loader
  with zero keys not loaded (a control with one foreign key does log the message) and the
  trained output.
"""
import math

import pytest
import torch

from comfy_inprocess import comfy_dirs  # noqa: F401  (a fixture)
from comfy_inprocess import (import_comfy, in_thread, lora_outputs, lora_through_comfyui, make_backend,
                             output_through_loader, randomize_lora)

import_comfy()

import comfy.model_management  # noqa: E402
import comfy.model_sampling  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

from comfy_tiny_families import Family  # noqa: E402
from comfy_tiny_flow import tiny_flow_family  # noqa: E402
from comfyui_prdp.config import TrainConfig  # noqa: E402
from comfyui_prdp.evaluation import sample_images  # noqa: E402
from comfyui_prdp.lora.files import load_lora  # noqa: E402
from comfyui_prdp.trainer import Trainer  # noqa: E402
from toy_backend import BrightnessReward  # noqa: E402

KINDS = ("flux", "sd3", "qwen-image")
TARGETS = {"flux": {"double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.qkv",
                    "double_blocks.0.txt_attn.proj", "single_blocks.0.linear1", "single_blocks.0.linear2"},
           "sd3": {"joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.x_block.attn.proj",
                   "joint_blocks.0.context_block.attn.qkv", "joint_blocks.0.context_block.attn.proj",
                   "joint_blocks.1.x_block.attn.qkv", "joint_blocks.1.x_block.attn.proj",
                   "joint_blocks.1.context_block.attn.qkv"},     # SD3's last context block is pre-only
           "qwen-image": {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                          "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.to_out.0"}}


@pytest.fixture(scope="module", params=KINDS)
def family(request):
    return tiny_flow_family(request.param)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def untouched(model, before):
    after = model.model.diffusion_model.state_dict()
    return model.weight_wrapper_patches == {} and set(after) == set(before) and \
        all(torch.equal(after[k], v) for k, v in before.items()) and \
        all(not getattr(m, "weight_function", None) and not getattr(m, "bias_function", None)
            and "forward" not in m.__dict__ for m in model.model.diffusion_model.modules())


def test_flow_models_are_recognised_by_sampling_type_and_get_their_architectures_targets(family):
    sampling = family.model.get_model_object("model_sampling")
    assert type(sampling).__name__ == "ModelSampling" and isinstance(sampling, comfy.model_sampling.CONST)
    before = snapshot(family.model)
    backend = make_backend(family)
    try:
        assert (backend.sampling_kind, backend.prediction) == ("flow", "x0")
        assert set(backend.adapters) == TARGETS[family.name]
        with pytest.raises(ValueError, match="no VP schedule"):
            backend.alphas_cumprod
    finally:
        backend.release()
    assert untouched(family.model, before)


def test_configured_targets_are_used_as_given(family):
    target = {"flux": "single_blocks.*.linear2", "sd3": "joint_blocks.*.x_block.mlp.fc2",
              "qwen-image": "transformer_blocks.*.img_mlp.net.2"}[family.name]
    backend = make_backend(family, targets=[target])
    try:
        assert len(backend.adapters) >= 1 and all(name.endswith(target.split("*")[-1]) for name in backend.adapters)
    finally:
        backend.release()
    with pytest.raises(ValueError, match="no module of this model matches"):
        make_backend(family, targets=["to_k_nowhere"])


def shifted(t, shift):
    return shift * t / (1 + (shift - 1) * t)


def flux_shifted(t, mu):
    out = math.exp(mu) / (math.exp(mu) + 1 / t.clamp(min=1e-12) - 1)
    return torch.where(t > 0, out, torch.zeros_like(t))


def flux_node_mu(width, height, max_shift=1.15, base_shift=0.5):
    slope = (max_shift - base_shift) / (4096 - 256)
    return width * height / (8 * 8 * 2 * 2) * slope + base_shift - slope * 256


def node_patched(model, schedule, **parameters):
    """What ComfyUI's ModelSamplingSD3 / ModelSamplingFlux nodes do (comfy_extras/
    nodes_model_advanced.py; not importable here beside this package's own `nodes`): a clone
    with a fresh CONST sampling object of that schedule as an object patch."""
    class ModelSamplingAdvanced(schedule, comfy.model_sampling.CONST):
        pass

    sampling = ModelSamplingAdvanced(model.model.model_config)
    sampling.set_parameters(**parameters)
    patched = model.clone()
    patched.add_object_patch("model_sampling", sampling)
    return patched


CASES = {"sd3 (its shift 3.0)": ("sd3", None, 3.0), "sd3 + ModelSamplingSD3 shift 1.0": ("sd3", 1.0, 1.0),
         "sd3 + ModelSamplingSD3 shift 6.0": ("sd3", 6.0, 6.0), "flux (its shift 1.15)": ("flux", None, 1.15),
         "flux + ModelSamplingFlux 1024x1024": ("flux", (1024, 1024), flux_node_mu(1024, 1024)),
         "flux + ModelSamplingFlux 512x768": ("flux", (512, 768), flux_node_mu(512, 768)),
         "qwen-image (its shift 1.15)": ("qwen-image", None, 1.15)}


@pytest.mark.parametrize("case", list(CASES))
def test_the_schedule_is_the_models_own_shifted_schedule(case):
    kind, node, shift = CASES[case]
    family = tiny_flow_family(kind)
    model = family.model
    steps = 8
    t = 1 - torch.arange(steps + 1, dtype=torch.float64) / steps
    if kind == "sd3":
        if node is not None:
            model = node_patched(model, comfy.model_sampling.ModelSamplingDiscreteFlow, shift=node, multiplier=1000)
        expected = shifted(t, shift)
    else:
        if node is not None:
            model = node_patched(model, comfy.model_sampling.ModelSamplingFlux, shift=flux_node_mu(*node))
        expected = flux_shifted(t, shift)
    backend = make_backend(Family(model, family.clip, family.vae, kind))
    try:
        sigmas = backend.flow_sigmas(steps)     # 8 steps divide the sigma table: the formula, to float32
        assert sigmas.dtype == torch.float64 and torch.allclose(sigmas, expected, atol=1e-6), (sigmas, expected)
        simple = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
        assert torch.equal(sigmas.float(), simple.float())      # ComfyUI's own scheduler
    finally:
        backend.release()


def raw_x0(backend, x, sigma, cond, guidance):
    """x0 = x - sigma * v from the diffusion model's raw velocity output, conditioning passed by hand."""
    patcher = backend.patcher
    comfy.model_management.load_models_gpu([patcher])
    model = patcher.model.diffusion_model
    with torch.no_grad():
        if isinstance(model, comfy.ldm.flux.model.Flux):
            v = model(x, sigma.float(), context=cond["context"], y=cond["pooled_output"],
                      guidance=torch.full((len(x),), guidance))
        elif "pooled_output" not in cond:    # Qwen-Image: timesteps = sigma, text features only
            v = model(x, sigma.float(), context=cond["context"])
        else:    # SD3's MMDiT takes timesteps sigma * 1000
            v = model(x, sigma.float() * 1000, context=cond["context"], y=cond["pooled_output"])
    return x - sigma.view(-1, *[1] * (x.dim() - 1)).float() * v.float()


@pytest.mark.parametrize("guidance", [None, 1.0, 6.0])
def test_predict_is_comfyuis_denoised_x0_without_vp_rescaling_and_guidance_reaches_flux(family, guidance):
    if family.name != "flux" and guidance is not None:
        pytest.skip(f"{family.name} is not guidance-distilled (it uses CFG)")
    backend = make_backend(family, guidance=guidance)
    try:
        randomize_lora(backend)
        cond = in_thread(lambda: backend.encode_prompts(["a cat", "a red house"]))
        assert cond["context"].shape[0] == 2
        assert ("pooled_output" in cond) == (family.name != "qwen-image")     # Qwen-Image has no pooled vector
        x = torch.randn(2, *backend.latent_shape(32, 32), generator=torch.Generator().manual_seed(3))
        sigma = torch.tensor([1.0, 0.4], dtype=torch.float64)
        with torch.no_grad():
            got = in_thread(lambda: backend.predict(x, sigma, cond).detach())
        expected = raw_x0(backend, x, sigma, cond, 3.5 if guidance is None else guidance)   # ComfyUI's default 3.5
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
        if family.name == "flux" and guidance is not None:
            other = raw_x0(backend, x, sigma, cond, guidance + 2.0)
            assert (other - got).abs().max() > 1e-4          # the value matters, so it is what reached the model
    finally:
        backend.release()


def tiny_run(family):
    """Flux.1-dev style: cfg 1 with guidance as conditioning; SD3: CFG. 3 steps = 2 trained + ODE."""
    return dict(epochs=2, prompts_per_epoch=2, images_per_prompt=2, updates_per_epoch=2, steps=3,
                cfg=1.0 if family.name == "flux" else 3.0, beta=0.05, clip_range=0.05, learning_rate=0.05,
                lora_rank=2, width=32, height=32, sample_batch_size=4, train_batch_size=3, seed=5)


def test_a_short_run_trains_on_policy_changes_samples_and_its_lora_loads_in_comfyui(family, tmp_path):
    short_run_trains_and_loads_in_comfyui(family, tmp_path)


def short_run_trains_and_loads_in_comfyui(family, tmp_path):
    before_weights = snapshot(family.model)
    config = TrainConfig(**tiny_run(family)).validate()
    backend = make_backend(family, guidance=3.5 if family.name == "flux" else None)
    try:
        seeds = [101, 102]
        samples_before = in_thread(lambda: sample_images(backend, ["a cat"], seeds, config))
        trainer = Trainer(backend, BrightnessReward(), ["a cat", "a dog", "a fox"], config, out_dir=tmp_path / "run")
        result = in_thread(trainer.run)
        assert result.epochs_done == 2 and not result.stopped
        for metrics in result.metrics:
            assert metrics["onpolicy_max_diff"] < 1e-5, metrics["onpolicy_max_diff"]
            assert all(math.isfinite(float(metrics[k])) for k in ("loss", "grad_norm", "kl"))
        samples_after = in_thread(lambda: sample_images(backend, ["a cat"], seeds, config))
        assert (samples_after - samples_before).abs().max() > 1e-3, "training did not change the samples"
        state, metadata = load_lora(result.lora_path)
        assert len(state) == 3 * len(backend.adapters)
        assert metadata["base_family"] == {"flux": "Flux", "sd3": "SD3", "qwen-image": "QwenImage",
                                           "chroma": "Chroma", "lumina2": "Lumina2"}[family.name]
        cond = in_thread(lambda: backend.encode_prompts(["a cat"]))
        x = torch.randn(1, *backend.latent_shape(32, 32), generator=torch.Generator().manual_seed(11))
        sigma = torch.tensor([0.6], dtype=torch.float64)
        trained, base = lora_outputs(backend, "predict", x, sigma, cond)
        assert (trained - base).abs().max() > 1e-5
    finally:
        backend.release()
    assert untouched(family.model, before_weights), "the user's MODEL changed"

    lora_file = comfy.utils.load_torch_file(str(result.lora_path))
    patched, not_loaded = lora_through_comfyui(family.model, lora_file)
    assert not not_loaded and len(patched.patches) == len(state) // 3
    through_loader = output_through_loader(family, patched, "predict", x, sigma, cond,
                                           guidance=3.5 if family.name == "flux" else None)
    assert torch.allclose(through_loader, trained, atol=1e-4), (through_loader - trained).abs().max()

    # the control: one key of a module this model does not have is reported by the same loader
    module = next(k for k in lora_file if k.endswith(".lora_down.weight")).split(".")[0]
    foreign = {(k.replace(module, module.replace("_0_", "_7_", 1)) if k.split(".")[0] == module else k): v
               for k, v in lora_file.items()}           # that module's three keys name block 7 (absent)
    assert set(foreign) != set(lora_file)
    _, not_loaded = lora_through_comfyui(family.model, foreign)
    assert not_loaded, "the control LoRA should have a key ComfyUI does not load"


def test_chroma_is_conditioned_as_comfyui_conditions_it_and_trains(tmp_path):
    """Chroma's T5 gives no pooled vector: ComfyUI's conditioning carries `pooled_output: None`,
    which Chroma's encode_adm indexes on 0.3.64 (a KeyError when the key is left out). Its
    default encoder gives no attention mask either. predict is the raw model's x0 (guidance 0,
    as Chroma's extra_conds defaults it), and a short run trains and loads in ComfyUI."""
    family = tiny_flow_family("chroma")
    backend = make_backend(family)
    try:
        randomize_lora(backend)
        cond = in_thread(lambda: backend.encode_prompts(["a cat", "a red house"]))
        assert set(cond) == {"context", "context_tokens"}          # no pooled vector, no attention mask
        x = torch.randn(2, *backend.latent_shape(32, 32), generator=torch.Generator().manual_seed(3))
        sigma = torch.tensor([1.0, 0.4], dtype=torch.float64)
        with torch.no_grad():
            got = in_thread(lambda: backend.predict(x, sigma, cond).detach())
        comfy.model_management.load_models_gpu([backend.patcher])
        rows = []
        for row in range(2):      # each prompt at its own token count, as the backend evaluates it
            tokens = int(cond["context_tokens"][row])
            with torch.no_grad():
                v = backend.patcher.model.diffusion_model(x[row:row + 1], sigma[row:row + 1].float(),
                                                          context=cond["context"][row:row + 1, :tokens],
                                                          guidance=torch.zeros(1))
            rows.append(x[row:row + 1] - sigma[row].float() * v.float())
        assert torch.allclose(got, torch.cat(rows), atol=1e-5), (got - torch.cat(rows)).abs().max()
    finally:
        backend.release()
    short_run_trains_and_loads_in_comfyui(family, tmp_path)


def test_lumina2_gets_its_targets_and_mask_trains_and_its_lora_loads_in_comfyui(tmp_path):
    """Lumina2's NextDiT (Z-Image's architecture) through ComfyUI's classes: the default targets
    become its attention's qkv / out, the encoder's attention mask reaches the conditioning per
    prompt, and a short run trains on policy and loads through ComfyUI's LoRA loader."""
    family = tiny_flow_family("lumina2")
    backend = make_backend(family)
    try:
        assert set(backend.adapters) == {"layers.0.attention.qkv", "layers.0.attention.out"}
        prompts = ["a cat", "a red house on a green hill"]
        cond = in_thread(lambda: backend.encode_prompts(prompts))
        for row, prompt in enumerate(prompts):           # each row's mask is its prompt's own
            with torch.inference_mode():
                alone = family.clip.encode_from_tokens_scheduled(family.clip.tokenize(prompt))[0][1]
            tokens = int(cond["context_tokens"][row])
            assert torch.equal(cond["attention_mask"][row, :tokens].cpu(), alone["attention_mask"][0])
        assert cond["context_tokens"][0] < cond["context_tokens"][1]
    finally:
        backend.release()
    short_run_trains_and_loads_in_comfyui(family, tmp_path)


@pytest.mark.parametrize("targets", [None, ["to_q", "to_k", "to_v"]])
def test_hidream_is_refused_up_front_in_one_line(targets):
    """HiDream's encoder always adds Llama features the backend does not pass: refused before
    anything is attached, with the default targets and with explicit ones."""
    family = tiny_flow_family("hidream")
    before = snapshot(family.model)
    with pytest.raises(ValueError, match="HiDream is not supported") as error:
        make_backend(family, **({} if targets is None else {"targets": targets}))
    assert "\n" not in str(error.value)
    assert untouched(family.model, before)


def first_gradient(family, gradient_checkpointing):
    """The LoRA gradient of the first optimizer step of a one-epoch run."""
    backend = make_backend(family, gradient_checkpointing=gradient_checkpointing)
    try:
        randomize_lora(backend, scale=0.2)
        config = TrainConfig(**{**tiny_run(family), "epochs": 1, "updates_per_epoch": 1}).validate()
        trainer = Trainer(backend, BrightnessReward(), ["a cat", "a dog"], config)
        grads, original = [], trainer.optimizer.step

        def step(*args, **kwargs):
            grads.append([p.grad.detach().clone() for p in backend.trainable_parameters()])
            return original(*args, **kwargs)

        trainer.optimizer.step = step
        in_thread(trainer.run)
        patched = 0 if backend._checkpointing is None else len(backend._checkpointing._patched)
        return grads[0], patched
    finally:
        backend.release()


def test_gradient_checkpointing_of_transformer_blocks_gives_the_same_gradient(family):
    """Flux blocks add residuals into their inputs in place and ComfyUI rewrites transformer_options
    between blocks: the recomputation in backward must still see what the forward saw."""
    plain, _ = first_gradient(family, False)
    checkpointed, patched = first_gradient(family, True)
    assert patched == {"flux": 2, "sd3": 2, "qwen-image": 1}[family.name]          # every transformer block
    largest = max(g.abs().max().item() for g in plain)
    assert largest > 0
    for a, b in zip(plain, checkpointed):      # float32 rounding of the recomputation apart (newer ComfyUI)
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * largest), (a - b).abs().max() / largest


class BackendSeen(Exception):
    pass


@pytest.mark.parametrize("preset, widget, expected", [
    ("consumer-gpu-flux", None, 3.5),          # an API prompt without the optional input
    ("consumer-gpu-flux", -1.0, 3.5),          # the widget's default: the preset's
    ("consumer-gpu-flux", 2.0, 2.0),           # the widget's value overrides the preset's
    ("consumer-gpu-sd35", -1.0, None)])        # no preset value: the model's own default
def test_the_train_node_hands_the_flow_guidance_to_the_backend(monkeypatch, comfy_dirs, preset, widget, expected):
    """The guidance reaches the model as ComfyUI conditions Flux (FluxGuidance) with cfg 1."""
    import importlib

    from comfy_inprocess import load_plugin_package

    plugin = load_plugin_package()
    node_class = plugin.NODE_CLASS_MAPPINGS["PRDPTrainLoRA"]
    backend_module = importlib.import_module(plugin.__name__ + ".comfyui_prdp.backends.comfyui.backend")

    def seen(*args, **kwargs):
        raise BackendSeen(kwargs)

    monkeypatch.setattr(backend_module, "ComfyBackend", seen)
    family = tiny_flow_family("flux")
    optional = {} if widget is None else {"flow_guidance": widget}
    with torch.inference_mode(), pytest.raises(BackendSeen) as caught:
        node_class().train(family.model, family.clip, family.vae, BrightnessReward(), prompts="a cat",
                           negative_prompt="", preset=preset, epochs=1, prompts_per_epoch=1,
                           images_per_prompt=2, steps=3, cfg=1.0, beta=2e-4, clip_range=1.5e-5, updates_per_epoch=1,
                           learning_rate=1e-4, lora_rank=2, width=64, height=64, seed=1, lora_name="flux-guidance",
                           **optional)
    assert caught.value.args[0]["guidance"] == expected


def t5_encoder_parameters(config: dict) -> int:
    """Parameters of a T5 encoder (gated feed-forward) of this config: embedding, per layer
    q/k/v/o, wi_0/wi_1/wo and two norms, the final norm."""
    d, inner, ff = config["d_model"], config["num_heads"] * config["d_kv"], config["d_ff"]
    layer = 4 * d * inner + 3 * d * ff + 2 * d
    return config["vocab_size"] * d + config["num_layers"] * layer + d


def test_the_flux_workflow_has_no_real_server_run_because_comfyui_builds_a_full_t5_xxl():
    """Why the Flux workflow ("Train and compare Flux with PickScore.json") is not run on a real server here
    (its graph is checked in tests/unit/test_nodes_validate.py, the train node on the tiny Flux above): DualCLIPLoader's flux
    type builds FluxClipModel, whose T5 is ComfyUI's T5XXLModel from the fixed t5_config_xxl.json,
    whatever the file holds. Fails, asking for that run, once ComfyUI's Flux T5 is small."""
    import inspect
    import json

    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip

    from comfy_inprocess import comfyui_root

    assert "T5XXLModel(" in inspect.getsource(comfy.text_encoders.flux.FluxClipModel.__init__)
    assert "t5_config_xxl.json" in inspect.getsource(comfy.text_encoders.sd3_clip.T5XXLModel.__init__)
    config = json.loads((comfyui_root() / "comfy" / "text_encoders" / "t5_config_xxl.json").read_text())
    parameters = t5_encoder_parameters(config)
    assert parameters > 10 ** 9, f"ComfyUI's Flux T5 has {parameters} parameters: run the Flux workflow on a server"
    pytest.skip(f"The Flux workflow on a real server: DualCLIPLoader (flux) builds Flux's T5 from "
                f"ComfyUI's fixed t5_config_xxl.json whatever the file holds (d_model {config['d_model']}, "
                f"{config['num_layers']} layers: {parameters / 1e9:.2f} B parameters, "
                f"{2 * parameters / 2 ** 30:.1f} GiB in fp16 to write, load and run per prompt on these CPUs)")


def lora_gradients_after(backend, before_forward):
    """The LoRA gradients of one training forward/backward in a fresh thread (as the job runs
    it), `before_forward()` run in that thread first (what ComfyUI does to the model there)."""
    cond = in_thread(lambda: backend.encode_prompts(["a cat"]))
    x = torch.randn(1, *backend.latent_shape(16, 16), generator=torch.Generator().manual_seed(4))

    def step():
        before_forward()
        backend.predict(x, torch.tensor([0.7]), cond).pow(2).mean().backward()
        return [p.grad for p in backend.trainable_parameters()]

    grads = in_thread(step)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_a_model_comfyui_evicts_from_inside_inference_mode_still_trains():
    """The job encodes and decodes under inference mode (as ComfyUI's nodes do); ComfyUI may evict
    the training model from there, giving its (ordinary, deep-copied) weights inference data.
    Modules outside ComfyUI's ops (Flux's RMSNorm scales) read theirs directly: training must
    still run. The eviction's moves copy, as on a GPU (tests/support/simulated_gpu.py)."""
    import comfy.model_management

    from comfyui_prdp.models.inference_tensors import make_ordinary
    from simulated_gpu import copying_moves

    family = tiny_flow_family("flux", seed=11)
    make_ordinary(family.model.model)            # what a deep copy (force_deepcopy) trains on
    backend = make_backend(family)

    def evict_in_inference_mode():
        backend.prepare_for_training()
        with copying_moves(), torch.inference_mode():
            comfy.model_management.unload_all_models()
        assert any(p.is_inference() for p in backend.patcher.model.diffusion_model.parameters())

    try:
        lora_gradients_after(backend, evict_in_inference_mode)
    finally:
        backend.release()


def test_a_shared_model_built_in_inference_mode_trains_after_a_copying_move():
    """Without host RAM for a deep copy the backend trains on the user's weights, built under
    inference mode; ComfyUI's moves outside it (the job thread's loads) swap their data and leave
    Parameters with no version counter. Modules outside ComfyUI's ops (Flux's RMSNorm scales)
    read theirs directly: training must still run (tests/support/simulated_gpu.py)."""
    from simulated_gpu import copying_moves

    backend = make_backend(tiny_flow_family("flux", seed=12))

    def load_with_copying_moves():
        with copying_moves():
            backend.prepare_for_training()

    try:
        lora_gradients_after(backend, load_with_copying_moves)
    finally:
        backend.release()
