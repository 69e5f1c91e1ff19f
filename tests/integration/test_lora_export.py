"""LoRA export: kohya key mapping, the backend's state-dict round trip, and diffusers'
`load_lora_weights` reading the file with no unmatched key and the trained model's output."""
import logging
import warnings

import pytest
import torch

from comfyui_prdp.lora import keys as lora_keys
from comfyui_prdp.backends.diffusers_backend import DiffusersBackend
from comfyui_prdp.config import preset
from comfyui_prdp.models.embedded import (MODEL_NAME, build_embedded_pipeline,
                                   build_embedded_stable_diffusion_pipeline)
from comfyui_prdp.lora.files import load_lora, lora_metadata, save_lora

EXTENDED_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "time_emb_proj"]


def make_backend(**overrides):
    return DiffusersBackend.from_components(**build_embedded_pipeline(0), config=preset("cpu-smoke", **overrides),
                                            device="cpu", model_name=MODEL_NAME)


def randomize_lora(backend, seed=1, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in backend.trainable_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def unet_inputs(n=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=generator), torch.tensor([999, 500, 21][:n])


# --- the pure name mapping --------------------------------------------------------------------
def test_kohya_names():
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert lora_keys.kohya_name(name) == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert lora_keys.kohya_key(name, lora_keys.DOWN).endswith("attn1_to_out_0.lora_down.weight")
    assert lora_keys.kohya_key(name, lora_keys.ALPHA).endswith("attn1_to_out_0.alpha")
    assert lora_keys.split_kohya_key("lora_unet_a_b.lora_up.weight") == ("lora_unet_a_b", "lora_up.weight")
    with pytest.raises(ValueError):
        lora_keys.split_kohya_key("unet.a.b.lora_A.weight")
    with pytest.raises(ValueError):
        lora_keys.kohya_key(name, "lora_A.weight")
    with pytest.raises(ValueError):
        lora_keys.kohya_name("")


def test_lookup_inverts_the_flattening_and_detects_collisions():
    names = ["down_blocks.0.attn1.to_q", "mid_block.attentions.0.proj_in", "up_blocks.1.attn2.to_out.0"]
    lookup = lora_keys.kohya_lookup(names)
    assert {lookup[lora_keys.kohya_name(n)] for n in names} == set(names)
    with pytest.raises(ValueError, match="share the kohya name"):
        lora_keys.kohya_lookup(["a.b_c", "a_b.c"])


def test_group_by_module_refuses_foreign_and_incomplete_keys():
    names = ["blocks.0.to_q", "blocks.0.to_k"]
    state = {lora_keys.kohya_key(n, s): torch.zeros(1) for n in names for s in lora_keys.SUFFIXES}
    grouped = lora_keys.group_by_module(state, names)
    assert set(grouped) == set(names) and set(grouped["blocks.0.to_q"]) == set(lora_keys.SUFFIXES)
    with pytest.raises(ValueError, match="match no adapted module"):
        lora_keys.group_by_module({**state, "lora_unet_other_to_v.lora_up.weight": torch.zeros(1)}, names)
    incomplete = {k: v for k, v in state.items() if not k.endswith("to_k.lora_up.weight")}
    with pytest.raises(ValueError, match="missing lora_down or lora_up"):
        lora_keys.group_by_module(incomplete, names)


# --- the backend's state dict -------------------------------------------------------------------
def test_state_dict_layout():
    backend = make_backend(lora_rank=3, lora_alpha=1.5)
    state = backend.lora_state_dict()
    modules = backend._lora_layers
    assert len(state) == 3 * len(modules)
    for module_name, layer in modules.items():
        down = state[lora_keys.kohya_key(module_name, lora_keys.DOWN)]
        up = state[lora_keys.kohya_key(module_name, lora_keys.UP)]
        alpha = state[lora_keys.kohya_key(module_name, lora_keys.ALPHA)]
        base = layer.base_layer
        assert down.shape == (3, base.in_features) and up.shape == (base.out_features, 3)
        assert alpha.dim() == 0 and alpha.item() == 1.5
        assert torch.count_nonzero(up) == 0 and torch.count_nonzero(down) > 0   # B = 0 at start
    for tensor in state.values():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous()
        assert not tensor.requires_grad
    # a copy: changing it does not touch the model
    next(iter(state.values())).add_(1.0)
    assert not torch.equal(next(iter(backend.lora_state_dict().values())), next(iter(state.values())))


def test_round_trip_reproduces_outputs():
    trained = make_backend()
    randomize_lora(trained)
    state = trained.lora_state_dict()
    fresh = make_backend()
    x, t = unet_inputs()
    cond = trained.encode_prompts(["a", "b", "c"])
    with torch.no_grad():
        assert not torch.allclose(fresh.predict_eps(x, t, cond), trained.predict_eps(x, t, cond))
        fresh.load_lora_state_dict(state)
        assert torch.equal(fresh.predict_eps(x, t, cond), trained.predict_eps(x, t, cond))
    again = fresh.lora_state_dict()
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)


def test_loading_folds_a_different_alpha_into_the_up_weights():
    trained = make_backend(lora_alpha=8.0)   # scale 2
    randomize_lora(trained)
    other = make_backend(lora_alpha=2.0)     # scale 0.5
    other.load_lora_state_dict(trained.lora_state_dict())
    x, t = unet_inputs()
    cond = trained.encode_prompts(["a", "b", "c"])
    with torch.no_grad():
        assert torch.allclose(other.predict_eps(x, t, cond), trained.predict_eps(x, t, cond), atol=1e-5)


def test_loading_refuses_a_lora_for_another_layout():
    state = make_backend().lora_state_dict()
    backend = make_backend()
    with pytest.raises(ValueError, match="rank"):
        make_backend(lora_rank=2).load_lora_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        make_backend(lora_targets=["to_q", "to_k", "to_v", "to_out.0", "proj_in"]).load_lora_state_dict(state)
    with pytest.raises(ValueError, match="match no adapted module"):
        make_backend(lora_targets=["to_q"]).load_lora_state_dict(state)
    partial = {k: v for k, v in state.items() if "down_blocks_0" not in k}
    with pytest.raises(ValueError, match="lacks"):
        backend.load_lora_state_dict(partial)


# --- diffusers reads the exported file ------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# diffusers always says this for a UNet-only LoRA; anything else is a problem
_BENIGN = "No LoRA keys associated to CLIPTextModel"


def load_into_fresh_pipeline(path):
    """A fresh pipeline of the same tiny model with the file loaded; and every warning raised."""
    pipe = build_embedded_stable_diffusion_pipeline(0)
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    problems = [m for m in handler.messages if _BENIGN not in m]
    problems += [str(w.message) for w in caught if "lora" in str(w.message).lower() or "key" in str(w.message).lower()]
    return pipe, problems


def peft_modules(unet):
    from peft.tuners.lora import LoraLayer
    return {name: module for name, module in unet.named_modules() if isinstance(module, LoraLayer)}


def export(backend, tmp_path, name="prdp.safetensors", state=None):
    config = preset("cpu-smoke")
    metadata = lora_metadata(config, backend, "jpeg-compressibility", epochs=3, prompt_count=2)
    return save_lora(tmp_path / name, backend.lora_state_dict() if state is None else state, metadata)


@pytest.mark.parametrize("targets", [None, EXTENDED_TARGETS], ids=["attention", "extended"])
def test_diffusers_load_lora_weights_matches_the_trained_unet(tmp_path, targets):
    backend = make_backend(**({} if targets is None else {"lora_targets": targets}), lora_alpha=2.0)
    randomize_lora(backend)
    path = export(backend, tmp_path)
    _, metadata = load_lora(path)
    assert metadata["reward"] == "jpeg-compressibility" and metadata["base_model"] == MODEL_NAME
    assert metadata["epochs"] == "3" and metadata["prompts_count"] == "2"

    pipe, problems = load_into_fresh_pipeline(path)
    assert problems == []
    loaded = peft_modules(pipe.unet)
    assert set(loaded) == set(backend._lora_layers)   # every module, nothing else
    for name, layer in loaded.items():   # the same weight delta, alpha/rank scale included
        (adapter,) = layer.lora_A.keys()
        ours = backend._lora_layers[name]
        delta = layer.scaling[adapter] * (layer.lora_B[adapter].weight.flatten(1) @ layer.lora_A[adapter].weight.flatten(1))
        expected = ours.scaling["prdp"] * (ours.lora_B["prdp"].weight.flatten(1) @ ours.lora_A["prdp"].weight.flatten(1))
        assert torch.allclose(delta, expected, atol=1e-6), name

    x, t = unet_inputs()
    cond = backend.encode_prompts(["a red apple", "a blue sky", ""])
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=cond["context"]).sample
        ours = backend.predict_eps(x, t, cond)
        with backend.adapters_disabled():
            base = backend.predict_eps(x, t, cond)
    assert (ours - base).abs().max() > 1e-2   # the LoRA matters, so agreement means something
    assert torch.allclose(theirs, ours, atol=1e-5)


def test_a_full_diffusers_pipeline_run_reproduces_the_trained_model(tmp_path):
    from diffusers import StableDiffusionPipeline

    backend = make_backend()
    randomize_lora(backend, scale=0.2)
    pipe, problems = load_into_fresh_pipeline(export(backend, tmp_path))
    assert problems == []
    trained_pipe = StableDiffusionPipeline(unet=backend.unet, text_encoder=backend.text_encoder,
                                           tokenizer=backend.tokenizer, vae=backend.vae,
                                           scheduler=build_embedded_pipeline(0)["scheduler"], safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    run = dict(prompt=["a cat", "a dog"], latents=latents, num_inference_steps=3, guidance_scale=3.0,
               height=64, width=64, output_type="pt")
    with torch.no_grad():
        loaded_images = pipe(**run).images
        trained_images = trained_pipe(**run).images
        with backend.adapters_disabled():
            base_images = trained_pipe(**run).images
    assert (trained_images - base_images).abs().max() > 1e-3
    assert torch.allclose(loaded_images, trained_images, atol=1e-4)


def test_the_unmatched_key_detector_can_fail(tmp_path):
    """Control: a renamed module is reported, and the loaded module set differs."""
    backend = make_backend()
    randomize_lora(backend)
    state = backend.lora_state_dict()
    victim = lora_keys.kohya_name(next(iter(backend._lora_layers)))
    for suffix in lora_keys.SUFFIXES:
        state[victim.replace("to_q", "to_x") + "." + suffix] = state.pop(f"{victim}.{suffix}")
    pipe, problems = load_into_fresh_pipeline(export(backend, tmp_path, state=state))
    assert any("unexpected" in message for message in problems)
    assert set(peft_modules(pipe.unet)) != set(backend._lora_layers)
