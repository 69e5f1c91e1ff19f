"""Each model reward against an independent computation of its authors' formula.

Tiny random backbones are saved in the real formats (reward_fixtures) and loaded through
`create_reward`, the code path users run. The references use the libraries' own pipelines:
transformers' CLIPImageProcessor / tokenizer, open_clip's create_model_and_transforms.
Images are 224x224 and uint8-quantised so both pipelines see identical pixels; resizing is
checked separately (test_rewards_loading.py) and end to end with a looser tolerance.
"""
from __future__ import annotations

import math

import pytest
import torch

import reward_fixtures as F
from comfyui_prdp.rewards import available_rewards, create_reward
from comfyui_prdp.rewards.loading import cached_model_keys

ATOL = 1e-4


@pytest.fixture(scope="module")
def model_dir():
    return F.reward_model_dir()


@pytest.fixture(scope="module")
def images224():
    return F.quantised(F.make_images(5, size=(224, 224), seed=1))


def _make(name, model_dir, **kwargs):
    if name.startswith("hpsv2"):
        kwargs.setdefault("arch", F.TINY_OPEN_CLIP)
    return create_reward(name, model_dir=model_dir, allow_download=False, device="cpu", **kwargs)


def _clip_image_processor():
    from transformers import CLIPImageProcessor

    # the processor settings of openai/clip-vit-large-patch14 and laion/CLIP-ViT-H-14
    return CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                              resample=3, do_center_crop=True, do_normalize=True,
                              image_mean=[0.48145466, 0.4578275, 0.40821073],
                              image_std=[0.26862954, 0.26130258, 0.27577711])


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _hf_image_embeddings(folder, images):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(folder)).eval()
    pixels = _clip_image_processor()(images=[F.to_pil(i) for i in images],
                                     return_tensors="pt").pixel_values
    with torch.no_grad():
        return model, _features(model.get_image_features(pixel_values=pixels))


def test_registry_names():
    for name in ("aesthetic", "pickscore", "hpsv2", "hpsv2.1", "clipscore", "weighted",
                 "jpeg-compressibility", "jpeg-incompressibility"):
        assert name in available_rewards()


def test_aesthetic_matches_reference(model_dir, images224):
    reward = _make("aesthetic", model_dir)
    _, embeddings = _hf_image_embeddings(model_dir / "clip-vit-large-patch14", images224)
    embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
    mlp = F.ReferenceAestheticMLP().eval()
    mlp.load_state_dict(torch.load(model_dir / "sac+logos+ava1-l14-linearMSE.pth"))
    with torch.no_grad():
        expected = mlp(embeddings).squeeze(-1)
    got = reward.score(images224, None)
    assert got.dtype == torch.float32 and got.shape == (5,)
    assert expected.std() > 1e-3  # the images really score differently
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


def test_pickscore_matches_reference(model_dir, images224):
    from transformers import AutoTokenizer

    folder = model_dir / "PickScore_v1"
    reward = _make("pickscore", model_dir)
    model, image_embs = _hf_image_embeddings(folder, images224)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    expected = []
    for index, prompt in enumerate(F.PROMPTS):  # the authors' example: one prompt at a time
        text = tokenizer(prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            text_embs = _features(model.get_text_features(**text))
        text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
        image = image_embs[index:index + 1] / image_embs[index:index + 1].norm(dim=-1, keepdim=True)
        expected.append(model.logit_scale.exp() * (text_embs @ image.T)[0, 0])
    expected = torch.stack(expected).detach()
    got = reward.score(images224, F.PROMPTS)
    assert abs(float(model.logit_scale.detach()) - math.log(100.0)) < 1e-4
    torch.testing.assert_close(got, expected, atol=ATOL * 100, rtol=1e-4)


@pytest.mark.parametrize("version,file", [("hpsv2", "HPS_v2_compressed.pt"),
                                          ("hpsv2.1", "HPS_v2.1_compressed.pt")])
def test_hps_matches_reference(model_dir, images224, version, file):
    import open_clip

    model, _, preprocess_val = open_clip.create_model_and_transforms(F.TINY_OPEN_CLIP, pretrained=None)
    checkpoint = torch.load(model_dir / file, map_location="cpu")
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(F.TINY_OPEN_CLIP)
    expected = []
    for image, prompt in zip(images224, F.PROMPTS):  # HPSv2's score(): one image at a time
        with torch.no_grad():
            image_features, text_features, _ = model(preprocess_val(F.to_pil(image)).unsqueeze(0),
                                                     tokenizer([prompt]))
        expected.append(torch.diagonal(image_features @ text_features.T)[0])
    expected = torch.stack(expected)
    got = _make(version, model_dir).score(images224, F.PROMPTS)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    assert got.abs().max() <= 1.0  # a cosine, no logit scale


def test_hps_versions_are_different_models(model_dir, images224):
    v2 = _make("hpsv2", model_dir).score(images224, F.PROMPTS)
    v21 = _make("hpsv2.1", model_dir).score(images224, F.PROMPTS)
    assert not torch.allclose(v2, v21)


def test_clipscore_formula_transformers_and_open_clip(model_dir, images224):
    import open_clip

    # transformers backbone (default folder name clip-vit-large-patch14): 2.5 * max(cos, 0)
    model, image_embs = _hf_image_embeddings(model_dir / "clip-vit-large-patch14", images224)
    from comfyui_prdp.rewards.clip_tokenizer import open_clip_tokenizer

    with torch.no_grad():
        text_embs = _features(model.get_text_features(input_ids=open_clip_tokenizer()(F.PROMPTS)))
    cos = torch.nn.functional.cosine_similarity(image_embs, text_embs, dim=-1)
    expected = 2.5 * cos.clamp(min=0)
    got = _make("clipscore", model_dir).score(images224, F.PROMPTS)
    assert (cos > 0).all()
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)

    # another transformers folder whose cosines are negative: clipped to exactly 0
    got_neg = _make("clipscore", model_dir, path=model_dir / "PickScore_v1").score(images224, F.PROMPTS)
    assert torch.equal(got_neg, torch.zeros(5))

    # open_clip backbone: weights in a file plus arch=
    oc_model, _, preprocess_val = open_clip.create_model_and_transforms(F.TINY_OPEN_CLIP, pretrained=None)
    oc_model.load_state_dict(torch.load(model_dir / "HPS_v2_compressed.pt")["state_dict"])
    oc_model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess_val(F.to_pil(i)) for i in images224])
        oc_cos = torch.nn.functional.cosine_similarity(
            oc_model.encode_image(pixels), oc_model.encode_text(open_clip.tokenize(F.PROMPTS)), dim=-1)
    got_oc = _make("clipscore", model_dir, path=model_dir / "HPS_v2_compressed.pt",
                   arch=F.TINY_OPEN_CLIP).score(images224, F.PROMPTS)
    torch.testing.assert_close(got_oc, 2.5 * oc_cos.clamp(min=0), atol=ATOL, rtol=1e-4)
    assert (got_oc > 0).any()


ALL = ["aesthetic", "pickscore", "hpsv2", "hpsv2.1", "clipscore"]


@pytest.mark.parametrize("name", ALL)
def test_batch_invariance_and_determinism(model_dir, name):
    images = F.make_images(5, size=(150, 260), seed=2)  # non-square: resize + crop on the way
    one_by_one = torch.cat([_make(name, model_dir, batch_size=1).score(images[i:i + 1], F.PROMPTS[i:i + 1])
                            for i in range(5)])
    batched = _make(name, model_dir, batch_size=2).score(images, F.PROMPTS)
    whole = _make(name, model_dir, batch_size=16).score(images, F.PROMPTS)
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(whole, one_by_one, atol=1e-4, rtol=1e-4)
    assert torch.equal(whole, _make(name, model_dir, batch_size=16).score(images, F.PROMPTS))
    assert torch.isfinite(whole).all()


@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "hpsv2"])
def test_end_to_end_on_resized_images_close_to_pil_pipeline(model_dir, name):
    """Large non-square images: our tensor resize vs the PIL pipeline, a looser tolerance."""
    images = F.quantised(F.make_images(3, size=(300, 420), seed=3))
    reward = _make(name, model_dir)
    got = reward.score(images, F.PROMPTS[:3])
    # same reward, but fed images already resized + cropped by PIL (the authors' pipeline)
    from torchvision import transforms

    pil_resize = transforms.Compose([transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
                                     transforms.CenterCrop(224), transforms.ToTensor()])
    pil_images = torch.stack([pil_resize(F.to_pil(i)).permute(1, 2, 0) for i in images])
    expected = reward.score(pil_images, F.PROMPTS[:3])
    scale = expected.abs().max().clamp(min=1.0)
    assert (got - expected).abs().max() / scale < 0.02


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_the_pixels(model_dir, name):
    reward = _make(name, model_dir)
    assert reward.differentiable
    images = F.make_images(2, size=(100, 120), seed=4).requires_grad_(True)
    with torch.enable_grad():
        scores = reward.score(images, F.PROMPTS[:2])
        assert scores.requires_grad
        scores.sum().backward()
    if name == "clipscore" and (scores == 0).all():
        pytest.skip("all cosines clipped at 0")
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    # without autograd the result is detached and no graph is kept
    plain = reward.score(images.detach(), F.PROMPTS[:2])
    assert not plain.requires_grad
    torch.testing.assert_close(plain, scores.detach())


def test_models_are_loaded_once_and_shared(model_dir):
    first = _make("aesthetic", model_dir)
    second = _make("aesthetic", model_dir)
    assert first.clip is second.clip and first.mlp is second.mlp
    clipscore = _make("clipscore", model_dir)  # the same ViT-L/14 folder as the aesthetic backbone
    assert clipscore.clip is first.clip
    keys = [k for k in cached_model_keys() if k[0] == "transformers-clip"]
    assert len(keys) == len(set(keys))
    # a different dtype is a different cache entry
    bf16 = _make("aesthetic", model_dir, dtype="bf16")
    assert bf16.clip is not first.clip and bf16.clip.dtype == torch.bfloat16


def test_bf16_scores_close_to_fp32(model_dir, images224):
    fp32 = _make("hpsv2", model_dir).score(images224, F.PROMPTS)
    bf16 = _make("hpsv2", model_dir, dtype="bf16").score(images224, F.PROMPTS)
    assert bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().max() < 0.05


def test_prepare_and_offload_keep_cpu_models_working(model_dir, images224):
    reward = _make("pickscore", model_dir)
    before = reward.score(images224[:2], F.PROMPTS[:2])
    reward.prepare()
    reward.offload()
    assert next(reward.clip.model.parameters()).device.type == "cpu"
    torch.testing.assert_close(reward.score(images224[:2], F.PROMPTS[:2]), before)


def test_input_validation(model_dir, images224):
    reward = _make("pickscore", model_dir)
    with pytest.raises(ValueError, match="prompts"):
        reward.score(images224, F.PROMPTS[:2])
    with pytest.raises(ValueError, match="needs one prompt per image"):
        reward.score(images224, None)
    with pytest.raises(TypeError, match="list of strings"):
        reward.score(images224[:1], "a cat")
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        reward.score(images224.permute(0, 3, 1, 2), F.PROMPTS)
    with pytest.raises(ValueError, match="batch_size"):
        _make("pickscore", model_dir, batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        _make("pickscore", model_dir, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            create_reward("pickscore", model_dir=model_dir, device="cuda")
    # the aesthetic score ignores prompts: None is fine
    assert _make("aesthetic", model_dir).score(images224[:1], None).shape == (1,)
