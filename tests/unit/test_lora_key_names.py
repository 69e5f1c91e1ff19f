"""The kohya key names of the LoRA exports, without ComfyUI: one literal key per case, so a
typo in a prefix or in the flattening fails here, not only in the ComfyUI loader tests.

Literals are sd-scripts' / A1111's names for SD1.5's first attention's query projection (the
diffusers module `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, which ComfyUI
names `input_blocks.1.1.transformer_blocks.0.attn1.to_q`), and ComfyUI's own name of Flux's
first double block's image qkv.
"""
import torch

from comfyui_prdp.lora import comfy_adapter as comfy_lora, keys as lora_keys

UNET_LDM = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
UNET_DIFFUSERS = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
UNET_KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
FLUX_LDM = "double_blocks.0.img_attn.qkv"
FLUX_KOHYA = "lora_unet_double_blocks_0_img_attn_qkv"


def factors(alpha=2.0):
    return comfy_lora.LoraFactors(torch.arange(6.0).view(2, 3), torch.arange(8.0).view(4, 2), alpha)


def test_a_unet_module_exports_its_kohya_key_in_diffusers_naming():
    state = comfy_lora.to_kohya({UNET_LDM: factors()}, {UNET_LDM: UNET_DIFFUSERS})
    assert set(state) == {UNET_KOHYA + ".lora_down.weight", UNET_KOHYA + ".lora_up.weight", UNET_KOHYA + ".alpha"}
    assert torch.equal(state[UNET_KOHYA + ".lora_down.weight"], factors().down)
    assert torch.equal(state[UNET_KOHYA + ".lora_up.weight"], factors().up)
    assert float(state[UNET_KOHYA + ".alpha"]) == 2.0


def test_a_transformer_module_keeps_comfyuis_name_in_its_kohya_key():
    state = comfy_lora.to_kohya({FLUX_LDM: factors()}, {})
    assert set(state) == {FLUX_KOHYA + ".lora_down.weight", FLUX_KOHYA + ".lora_up.weight", FLUX_KOHYA + ".alpha"}


def test_the_literal_keys_load_back_onto_their_modules():
    state = {UNET_KOHYA + ".lora_down.weight": factors().down, UNET_KOHYA + ".lora_up.weight": factors().up,
             UNET_KOHYA + ".alpha": torch.tensor(2.0)}
    loaded = comfy_lora.from_state_dict(state, [UNET_LDM], {UNET_LDM: UNET_DIFFUSERS})
    assert set(loaded) == {UNET_LDM} and loaded[UNET_LDM].alpha == 2.0
    assert torch.equal(loaded[UNET_LDM].down, factors().down) and torch.equal(loaded[UNET_LDM].up, factors().up)


def test_the_diffusers_backends_kohya_key_is_the_same_literal():
    assert lora_keys.kohya_key(UNET_DIFFUSERS, "lora_down.weight") == UNET_KOHYA + ".lora_down.weight"
    assert lora_keys.split_kohya_key(UNET_KOHYA + ".alpha") == (UNET_KOHYA, "alpha")
