"""The world model: the lossless pixel 'VAE', deterministic cached pretraining (a broken cache
file is rebuilt, never trusted) and prompt following that is good but leaves room to learn."""
import pytest
import torch

from comfyui_prdp.world import pretrain
from comfyui_prdp.world.model import build_world_pipeline
from comfyui_prdp.world.pixel_vae import PixelUnshuffleVAE


def test_pixel_vae_is_lossless_and_has_a_factor_of_four():
    vae = PixelUnshuffleVAE()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = vae.encode(pixels).latent_dist.mean
    assert latents.shape == (2, 48, 8, 8) and vae.config.latent_channels == 48
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 4
    assert torch.equal(vae.decode(latents).sample, pixels)


@pytest.fixture
def tiny_pretraining(monkeypatch, tmp_path):
    """Pretraining shrunk to a few steps (own cache key), cached under tmp_path."""
    monkeypatch.setenv("PRDP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(pretrain, "UNET_STEPS", 3)
    monkeypatch.setattr(pretrain, "POOL_SIZE", 64)
    monkeypatch.setattr(pretrain.pretrain_unet, "__defaults__", (3,))
    return tmp_path


def _weights(components):
    return {f"{part}.{k}": v.clone() for part in ("unet", "text_encoder")
            for k, v in components[part].state_dict().items()}


def test_pretraining_is_deterministic_cached_and_rebuilt_when_the_cache_is_broken(tiny_pretraining, monkeypatch):
    first = _weights(build_world_pipeline(0))
    files = list(tiny_pretraining.glob("world-sd-*.safetensors"))
    assert len(files) == 1
    untrained = _weights(build_world_pipeline(0, pretrained=False))
    assert any(not torch.equal(first[k], untrained[k]) for k in first)     # it did train

    calls = []
    real = pretrain.pretrain
    monkeypatch.setattr(pretrain, "pretrain", lambda *a: calls.append(a) or real(*a))
    cached = _weights(build_world_pipeline(0))
    assert not calls and all(torch.equal(first[k], cached[k]) for k in first)   # loaded, not retrained

    files[0].write_bytes(b"not a safetensors file")
    ambient = torch.get_num_threads()
    other = 1 if ambient != 1 else 3
    torch.set_num_threads(other)     # another OMP_NUM_THREADS: the same weights
    try:
        rebuilt = _weights(build_world_pipeline(0))
        assert torch.get_num_threads() == other    # restored after pretraining
    finally:
        torch.set_num_threads(ambient)
    assert len(calls) == 1 and all(torch.equal(first[k], rebuilt[k]) for k in first)   # same seed, same weights


# Prompt following of the pretrained model (cached after first use), judged by world-alignment on
# 64 samples (8 training + 8 unseen captions x 4 seeds): per attribute, how often the own caption
# scores above the caption with that attribute changed ("most of the time"), and how often it
# beats all six changed captions at once ("not always"). Measured with the seed-0 model: attribute
# wins 73 % (colour 97, background 98, size 66, shape 61, position 58, count 56), all six 19 %.
ATTRIBUTE_WINS_AT_LEAST = 0.65
ALL_RIGHT_AT_MOST = 0.6


def test_pretrained_samples_follow_the_prompt_often_but_not_always():
    import random

    from comfyui_prdp.backends.diffusers_backend import DiffusersBackend
    from comfyui_prdp.config import preset
    from comfyui_prdp.evaluation import sample_images
    from comfyui_prdp.rewards import create_reward
    from comfyui_prdp.world.demo_eval import eval_prompts
    from comfyui_prdp.world.grammar import ATTRIBUTES, parse_caption, sample_prompts, train_prompts

    config = preset("cpu-smoke", width=32, height=32)
    backend = DiffusersBackend.from_components(**build_world_pipeline(0), config=config)
    prompts = sample_prompts(train_prompts(), 8, 3) + eval_prompts(seed=3)
    seeds = [0, 1, 2, 3]
    images = sample_images(backend, prompts, seeds, config, lora=False)
    rows = [parse_caption(p) for p in prompts for _ in seeds]
    reward = create_reward("world-alignment")
    own = reward.score(images, [s.caption() for s in rows])
    rng = random.Random(0)
    wins = {}
    for name, values in ATTRIBUTES.items():
        changed = [s.replace(**{name: rng.choice([v for v in values if v != getattr(s, name)])}) for s in rows]
        wins[name] = own > reward.score(images, [s.caption() for s in changed])
    every = torch.stack(list(wins.values()))
    summary = (f"attribute wins {every.float().mean():.0%} ("
               + ", ".join(f"{k} {v.float().mean():.0%}" for k, v in wins.items())
               + f"), all six right {every.all(0).float().mean():.0%}")
    assert every.float().mean() >= ATTRIBUTE_WINS_AT_LEAST, summary
    assert every.all(0).float().mean() <= ALL_RIGHT_AT_MOST, summary


def test_world_demo_preset_puts_the_lora_on_self_attention_only():
    """The world-demo preset (config.py) trains self-attention only: its targets must match
    layers of the world UNet, and none of the cross-attention (the text side: there the
    unseen-caption alignment fell, README)."""
    from comfyui_prdp.backends.diffusers_backend import DiffusersBackend
    from comfyui_prdp.config import preset

    config = preset("world-demo")
    backend = DiffusersBackend.from_components(**build_world_pipeline(0, pretrained=False), config=config)
    names = [name for name, p in backend.unet.named_parameters() if p.requires_grad]
    assert names and all(".attn1." in name and "lora_" in name for name in names), names[:4]
    assert len(names) == 2 * 4 * sum(1 for n, _ in backend.unet.named_modules() if n.endswith(".attn1"))
