"""ImageReward in our module definitions vs the same weights in independent implementations:
timm's VisionTransformer (BLIP's ViT is timm's), transformers' BlipTextModel (a port of
BLIP's BERT with cross-attention), ImageReward's preprocessing and tokenisation."""
from __future__ import annotations

import pytest
import torch

import reward_fixtures as F
from comfyui_prdp.rewards import RewardModelFileError, RewardModelNotFoundError, create_reward
from comfyui_prdp.rewards.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD


@pytest.fixture(scope="module")
def model_dir():
    return F.reward_model_dir()


def _make(model_dir, **kwargs):
    return create_reward("imagereward", model_dir=model_dir, allow_download=False, device="cpu", **kwargs)


def _reference_scores(model_dir, images, prompts):
    """ImageReward.score(), step by step, for one image and prompt at a time."""
    from torchvision import transforms
    from transformers import BertTokenizer

    vision, text, mlp = F.tiny_imagereward_parts()
    preprocess = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    tokenizer = BertTokenizer(vocab=str(model_dir / "bert-base-uncased" / "vocab.txt"))
    scores = []
    for image, prompt in zip(images, prompts):
        tokens = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        with torch.no_grad():
            image_embeds = vision.forward_features(preprocess(F.to_pil(image)).unsqueeze(0))
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
            out = text(tokens.input_ids, attention_mask=tokens.attention_mask,
                       encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                       is_decoder=False)
            raw = mlp(out.last_hidden_state[:, 0, :].float())
        scores.append(((raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD)[0, 0])
    return torch.stack(scores)


def test_tokenizer_reference_is_what_it_claims(model_dir):
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab=str(model_dir / "bert-base-uncased" / "vocab.txt"))
    ids = tokenizer("A photo of cats", padding="max_length", max_length=35, truncation=True).input_ids
    vocab = F.BERT_VOCAB
    assert [vocab[i] for i in ids[:6]] == ["[CLS]", "a", "photo", "of", "cat", "##s"]
    assert vocab[ids[6]] == "[SEP]" and len(ids) == 35


def test_imagereward_matches_independent_implementation(model_dir):
    images = F.quantised(F.make_images(5, size=(224, 224), seed=8))
    prompts = F.PROMPTS[:4] + ["an unknown word " * 20]  # truncation at 35 tokens
    expected = _reference_scores(model_dir, images, prompts)
    got = _make(model_dir).score(images, prompts)
    assert expected.std() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_imagereward_batches_and_gradients(model_dir):
    images = F.make_images(5, size=(150, 260), seed=9)
    one = torch.cat([_make(model_dir, batch_size=1).score(images[i:i + 1], F.PROMPTS[i:i + 1])
                     for i in range(5)])
    batched = _make(model_dir, batch_size=2).score(images, F.PROMPTS)
    torch.testing.assert_close(batched, one, atol=1e-4, rtol=1e-4)
    assert torch.equal(batched, _make(model_dir, batch_size=2).score(images, F.PROMPTS))
    pixels = images[:2].clone().requires_grad_(True)
    with torch.enable_grad():
        _make(model_dir).score(pixels, F.PROMPTS[:2]).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0 and torch.isfinite(pixels.grad).all()


def test_imagereward_in_a_weighted_sum(model_dir):
    images = F.make_images(3, seed=10)
    weighted = create_reward("weighted", components="imagereward:1, aesthetic:0.5", model_dir=model_dir,
                             allow_download=False, device="cpu")
    total, parts = weighted.score_with_components(images, F.PROMPTS[:3])
    torch.testing.assert_close(total, parts["imagereward"] + 0.5 * parts["aesthetic"])


def test_imagereward_file_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("PRDP_REWARD_MODELS", raising=False)
    with pytest.raises(RewardModelNotFoundError, match="ImageReward.pt") as error:
        create_reward("imagereward", model_dir=tmp_path, allow_download=False)
    assert "THUDM/ImageReward" in str(error.value)
    F.copy_of("ImageReward.pt", tmp_path)
    with pytest.raises(RewardModelNotFoundError, match="bert-base-uncased") as error:
        create_reward("imagereward", model_dir=tmp_path, allow_download=False)
    assert "vocab.txt" in str(error.value)
    F.copy_of("bert-base-uncased", tmp_path)
    # a HPS checkpoint under ImageReward's name
    (tmp_path / "ImageReward.pt").write_bytes((F.reward_model_dir() / "HPS_v2_compressed.pt").read_bytes())
    with pytest.raises(RewardModelFileError, match="lacks blip.visual_encoder.cls_token"):
        create_reward("imagereward", model_dir=tmp_path, allow_download=False)
    # truncated
    (tmp_path / "ImageReward.pt").write_bytes((F.reward_model_dir() / "ImageReward.pt").read_bytes()[:3000])
    with pytest.raises(RewardModelFileError, match="corrupt"):
        create_reward("imagereward", model_dir=tmp_path, allow_download=False)
    # a vocabulary larger than the model's embedding table
    (tmp_path / "ImageReward.pt").write_bytes((F.reward_model_dir() / "ImageReward.pt").read_bytes())
    big = tmp_path / "big-vocab"
    big.mkdir()
    (big / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]"] + [f"w{i}" for i in range(40)]
                                             + ["[SEP]", "[MASK]", "a", "test", "prompt"]) + "\n")
    with pytest.raises(RewardModelFileError, match="does not fit"):
        create_reward("imagereward", model_dir=tmp_path, tokenizer_path=big, allow_download=False)


def test_each_tower_matches_its_reference(model_dir):
    """Tower by tower, where differences are not hidden by the head's scale."""
    from transformers import BertTokenizer

    model = _make(model_dir).model
    vision, text, _ = F.tiny_imagereward_parts()
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours_image = model.blip.visual_encoder(pixels)
        torch.testing.assert_close(ours_image, vision.forward_features(pixels), atol=2e-6, rtol=1e-5)
        tokens = BertTokenizer(vocab=str(model_dir / "bert-base-uncased" / "vocab.txt"))(
            ["a cat", "a horse in a field"], padding="max_length", max_length=35, return_tensors="pt")
        ours_text = model.blip.text_encoder(tokens.input_ids, tokens.attention_mask, ours_image)
        reference = text(tokens.input_ids, attention_mask=tokens.attention_mask,
                         encoder_hidden_states=ours_image,
                         encoder_attention_mask=torch.ones(ours_image.shape[:-1], dtype=torch.long),
                         is_decoder=False).last_hidden_state
    real = tokens.attention_mask.bool()  # padding positions are never read
    torch.testing.assert_close(ours_text[real], reference[real], atol=2e-6, rtol=1e-5)
