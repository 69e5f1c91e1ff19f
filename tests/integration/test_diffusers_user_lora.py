"""The diffusers backend keeps a LoRA the user already loaded, in the policy and in the base
model of the log-ratio; and refuses schedulers whose x0 clipping the sampler would not apply."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from peft import LoraConfig

from comfyui_prdp.backends.diffusers_backend import DiffusersBackend
from comfyui_prdp.config import preset
from comfyui_prdp.models.embedded import build_embedded_pipeline


def unet_eps(unet, x, t, context):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=context).sample


def test_user_lora_stays_in_effect_with_the_prdp_adapter_on_and_off():
    components = build_embedded_pipeline(0)
    unet = components["unet"]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([700, 100])
    with torch.no_grad():
        context = components["text_encoder"](
            components["tokenizer"](["a red apple", "a cat"], padding="max_length", max_length=77,
                                    truncation=True, return_tensors="pt").input_ids)[0]
    bare = unet_eps(unet, x, t, context)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"], init_lora_weights=True),
                     adapter_name="user_style")
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    with_user = unet_eps(unet, x, t, context)
    assert (with_user - bare).abs().max() > 1e-3, "the user's LoRA must change the output"

    backend = DiffusersBackend.from_components(**components, config=preset("cpu-smoke"), device="cpu")
    assert backend.user_adapters == ["user_style"]
    cond = {"context": context}
    with torch.no_grad():
        fresh = backend.predict_eps(x, t, cond)
    assert torch.allclose(fresh, with_user, atol=1e-5), "a zero PRDP LoRA must leave the user's model as it was"

    with torch.no_grad():
        for parameter in backend.trainable_parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        trained = backend.predict_eps(x, t, cond)
        with backend.adapters_disabled():
            base = backend.predict_eps(x, t, cond)
        again = backend.predict_eps(x, t, cond)
    assert (trained - with_user).abs().max() > 1e-3
    assert torch.allclose(base, with_user, atol=1e-5), "the base model must include the user's LoRA"
    assert torch.allclose(again, trained, atol=1e-6)

    trainable = {id(p) for p in backend.trainable_parameters()}
    user_params = [p for n, p in unet.named_parameters() if "user_style" in n]
    assert user_params and not any(p.requires_grad for p in user_params)
    assert not trainable & {id(p) for p in user_params}
    assert all(".alpha" in k or "lora_" in k for k in backend.lora_state_dict())
    assert len(backend.lora_state_dict()) == 3 * len(backend._lora_layers)


@pytest.mark.parametrize("scheduler", [
    DDIMScheduler(clip_sample=True),
    DDPMScheduler(),                                     # clip_sample defaults to True there
    DDIMScheduler(clip_sample=False, thresholding=True),
])
def test_scheduler_with_x0_clipping_is_refused(scheduler):
    components = build_embedded_pipeline(0)
    components["scheduler"] = scheduler
    with pytest.raises(ValueError, match=r"(clip_sample|thresholding)=True.*scheduler_config.json"):
        DiffusersBackend.from_components(**components, config=preset("cpu-smoke"), device="cpu")
