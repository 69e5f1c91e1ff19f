"""The diffusers SDXL backend on tiny StableDiffusionXLPipeline components built from configs:
two text encoders + pooled embedding + add_time_ids reach the UNet (the training size, no
crop), v-prediction with a zero-terminal-SNR scheduler converts to eps, a saved folder loads
through load_backend, a short run is on-policy, and the exported LoRA loaded with diffusers'
load_lora_weights gives the trained adapters' output."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from comfyui_prdp.backends.diffusers_sdxl import DiffusersSDXLBackend  # noqa: E402
from comfyui_prdp.config import TrainConfig  # noqa: E402
from comfyui_prdp.lora.files import save_lora  # noqa: E402
from comfyui_prdp.models.loading import load_backend  # noqa: E402
from comfyui_prdp.models.tokenizer_offline import offline_clip_tokenizer  # noqa: E402

CONFIG = TrainConfig(epochs=1, prompts_per_epoch=2, images_per_prompt=2, updates_per_epoch=1, steps=2, cfg=2.0,
                     beta=0.05, clip_range=0.05, learning_rate=0.02, lora_rank=2, width=16, height=16,
                     sample_batch_size=4, train_batch_size=3, seed=3)


def tiny_components(v_prediction=False, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                vocab_size=49408, max_position_embeddings=77, projection_dim=32, hidden_act="gelu")
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        **({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True} if v_prediction else {}))
    return dict(unet=unet.eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**text)).eval(),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)).eval(),
                tokenizer=offline_clip_tokenizer(), tokenizer_2=offline_clip_tokenizer(), vae=vae.eval(),
                scheduler=scheduler)


def make_backend(v_prediction=False, **config):
    return DiffusersSDXLBackend(**tiny_components(v_prediction), config=CONFIG.replace(**config), device="cpu")


def randomize_lora(backend, scale=0.1, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in backend.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


def raw_unet(unet, x, t, cond, height, width):
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(len(x), 1)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=cond["context"],
                    added_cond_kwargs={"text_embeds": cond["pooled_output"], "time_ids": time_ids}).sample


def test_both_text_encoders_pooled_output_and_the_training_size_reach_the_unet():
    backend = make_backend()
    cond = backend.encode_prompts(["a cat", "a dog"])
    assert cond["context"].shape == (2, 77, 64) and cond["pooled_output"].shape == (2, 32)
    ids = backend.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        second = backend.text_encoder_2(ids, output_hidden_states=True)
        first = backend.text_encoder(ids, output_hidden_states=True)
    assert torch.allclose(cond["context"][:1], torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1))
    assert torch.allclose(cond["pooled_output"][:1], second.text_embeds)
    t = torch.tensor([700, 100])
    for height, width in ((16, 16), (16, 32)):
        x = torch.randn(2, 4, height // 2, width // 2, generator=torch.Generator().manual_seed(width))
        with torch.no_grad():
            eps = backend.predict_eps(x, t, cond)
        with backend.adapters_disabled():
            expected = raw_unet(backend.unet, x, t, cond, height, width)
            other = raw_unet(backend.unet, x, t, cond, 2 * height, 2 * width)
        assert torch.allclose(eps, expected, atol=1e-5) and (other - eps).abs().max() > 1e-4
    with torch.no_grad():
        changed = backend.predict_eps(x, t, dict(cond, pooled_output=cond["pooled_output"] + 1))
    assert (changed - eps).abs().max() > 1e-4, "the pooled output does not reach the UNet"


def test_v_prediction_with_zero_terminal_snr_converts_to_eps():
    backend = make_backend(v_prediction=True)
    a_bar = backend.alphas_cumprod
    assert a_bar[-1] < 1e-6          # rescale_betas_zero_snr (diffusers clamps the last alpha_bar)
    cond = backend.encode_prompts(["a cat", "a dog", "a fox"])
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([999, 500, 10])
    with torch.no_grad():
        eps = backend.predict_eps(x, t, cond)
    v = raw_unet(backend.unet, x, t, cond, 16, 16).double()
    a = a_bar[t].view(-1, 1, 1, 1)
    expected = (1 - a).sqrt() * x.double() + a.sqrt() * v
    assert torch.allclose(eps.double(), expected, atol=1e-5)
    assert backend.lora_info()["family"].kohya_version == "sdxl_base_v1-0"
    assert backend.lora_info()["family"].v_prediction


def test_a_saved_sdxl_folder_loads_and_a_short_run_is_on_policy(tmp_path):
    from comfyui_prdp.rewards.base import Reward
    from comfyui_prdp.trainer import Trainer

    pipe = diffusers.StableDiffusionXLPipeline(**tiny_components())
    pipe.save_pretrained(tmp_path / "tiny-sdxl")
    backend = load_backend(str(tmp_path / "tiny-sdxl"), CONFIG, device="cpu")
    assert isinstance(backend, DiffusersSDXLBackend)

    class Brightness(Reward):
        name = "brightness"

        def score(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    result = Trainer(backend, Brightness(), ["a cat", "a dog"], CONFIG.replace(epochs=2)).run()
    assert [m["onpolicy_max_diff"] < 1e-5 for m in result.metrics] == [True, True], result.metrics
    assert max(p.abs().max().item() for p in backend.trainable_parameters()[1::2]) > 0   # lora_B moved


def test_exported_lora_loads_with_diffusers_load_lora_weights_with_the_same_output(tmp_path):
    backend = make_backend()
    randomize_lora(backend)
    path = save_lora(tmp_path / "sdxl_lora.safetensors", backend.lora_state_dict(), {"format": "test"})
    cond = backend.encode_prompts(["a cat"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([400])
    with torch.no_grad():
        trained = backend.predict_eps(x, t, cond)
        with backend.adapters_disabled():
            base = backend.predict_eps(x, t, cond)
    assert (trained - base).abs().max() > 1e-4
    pipe = diffusers.StableDiffusionXLPipeline(**tiny_components())      # same seed: the same base weights
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        loaded = raw_unet(pipe.unet, x, t, cond, 16, 16)
    assert torch.allclose(loaded, trained, atol=1e-5), (loaded - trained).abs().max()
