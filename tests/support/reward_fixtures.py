"""Tiny random-weight reward models saved in the real file formats (built once per process).

- `reward_model_dir()` lays out a reward-model folder exactly as users do:
    sac+logos+ava1-l14-linearMSE.pth     aesthetic MLP state dict (real keys, 768 inputs)
    clip-vit-large-patch14/              transformers CLIPModel (projection 768), no tokenizer
    PickScore_v1/                        transformers CLIPModel + tokenizer built from open_clip's BPE
    HPS_v2_compressed.pt                 {"state_dict": ...} of a tiny open_clip model
    HPS_v2.1_compressed.pt               the same format, other weights
    ImageReward.pt                       tiny BLIP ViT + BERT with cross-attention + MLP head
    bert-base-uncased/vocab.txt          a small WordPiece vocabulary
- `TINY_OPEN_CLIP`: a tiny open_clip architecture registered from a JSON config; the HPS
  rewards load with arch=TINY_OPEN_CLIP.
Nothing here imports the code under test except to build the tokenizer files.
"""
from __future__ import annotations

import atexit
import functools
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

TINY_OPEN_CLIP = "prdp-tiny-open-clip"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PROMPTS = ["a photo of an astronaut", "a cat sitting on a sofa", "a cup of coffee",
           "a red rocket on a launch pad", "a horse in a field"]


@functools.lru_cache(maxsize=None)
def _scratch() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="prdp-reward-fixtures-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@functools.lru_cache(maxsize=None)
def register_tiny_open_clip() -> str:
    """Register TINY_OPEN_CLIP with open_clip from a JSON file; returns its name."""
    import open_clip

    config_dir = _scratch() / "open_clip_configs"
    config_dir.mkdir(exist_ok=True)
    (config_dir / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config_dir / f"{TINY_OPEN_CLIP}.json")
    assert TINY_OPEN_CLIP in open_clip.list_models()
    return TINY_OPEN_CLIP


def tiny_open_clip_state(seed: int) -> dict:
    """A randomly initialised tiny open_clip model's state dict (logit scale log(100))."""
    import open_clip

    register_tiny_open_clip()
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    return {k: v.clone() for k, v in model.state_dict().items()}


def tiny_transformers_clip(seed: int, projection_dim: int = 768, logit_scale: float = math.log(100.0)):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=projection_dim,
        logit_scale_init_value=logit_scale,
    )
    return CLIPModel(config).eval()


class ReferenceAestheticMLP(nn.Module):
    """Written from the predictor's published definition (not the code under test)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def reference_aesthetic_mlp(seed: int = 3, input_size: int = 768) -> ReferenceAestheticMLP:
    torch.manual_seed(seed)
    mlp = ReferenceAestheticMLP(input_size).eval()
    with torch.no_grad():  # spread outputs so differences between images are visible
        for layer in mlp.layers:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(4.0)
                layer.bias.normal_(0, 0.1)
    return mlp


BERT_WORDS = sorted({w for p in PROMPTS for w in p.lower().replace(",", " ").split()} | {"dog", "##s", "!"})
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BERT_WORDS


@functools.lru_cache(maxsize=None)
def tiny_imagereward_parts(seed: int = 6):
    """(vision, text, mlp) of a tiny ImageReward built from independent code: timm's
    VisionTransformer (BLIP's ViT is timm's) and transformers' BlipTextModel (a port of BLIP's
    med.py BERT with cross-attention), plus the MLP head."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer
    from transformers import BlipTextConfig, BlipTextModel

    torch.manual_seed(seed)
    vision = VisionTransformer(img_size=224, patch_size=32, embed_dim=128, depth=2, num_heads=2,
                               mlp_ratio=2.0, qkv_bias=True, num_classes=0, global_pool="",
                               class_token=True, norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    with torch.no_grad():
        vision.pos_embed.normal_(0, 0.5)
        vision.cls_token.normal_(0, 0.5)
    config = BlipTextConfig(vocab_size=len(BERT_VOCAB) + 2, hidden_size=128, encoder_hidden_size=128,
                            intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=64, layer_norm_eps=1e-12, hidden_act="gelu",
                            is_decoder=True, pad_token_id=0, bos_token_id=None, sep_token_id=None,
                            eos_token_id=None)
    text = BlipTextModel(config, add_pooling_layer=False).eval()
    mlp = reference_aesthetic_mlp(seed=seed, input_size=128)
    return vision, text, mlp


def imagereward_state(seed: int = 6) -> dict:
    """ImageReward.pt's layout: blip.visual_encoder.*, blip.text_encoder.*, mlp.*, plus the
    projections and position ids the real file also carries."""
    vision, text, mlp = tiny_imagereward_parts(seed)
    state = {f"blip.visual_encoder.{k}": v for k, v in vision.state_dict().items()}
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    state["blip.vision_proj.weight"] = torch.zeros(256, 128)
    state["blip.text_proj.weight"] = torch.zeros(256, 128)
    state.update({f"mlp.{k}": v for k, v in mlp.state_dict().items()})
    return state


@functools.lru_cache(maxsize=None)
def reward_model_dir() -> Path:
    """A folder with every tiny reward model in its real format (see the module docstring)."""
    from comfyui_prdp.rewards.clip_tokenizer import build_hf_clip_tokenizer

    folder = _scratch() / "reward_models"
    folder.mkdir()
    torch.save(reference_aesthetic_mlp().state_dict(), folder / "sac+logos+ava1-l14-linearMSE.pth")
    clip = tiny_transformers_clip(seed=1)
    with torch.no_grad():  # this random model's cosines come out negative; flip them positive
        clip.text_projection.weight.neg_()
    clip.save_pretrained(folder / "clip-vit-large-patch14")
    pick = folder / "PickScore_v1"
    tiny_transformers_clip(seed=2).save_pretrained(pick)
    build_hf_clip_tokenizer().save_pretrained(pick)
    torch.save({"state_dict": tiny_open_clip_state(seed=4), "epoch": 1}, folder / "HPS_v2_compressed.pt")
    torch.save({"state_dict": tiny_open_clip_state(seed=5)}, folder / "HPS_v2.1_compressed.pt")
    torch.save(imagereward_state(), folder / "ImageReward.pt")
    (folder / "bert-base-uncased").mkdir()
    (folder / "bert-base-uncased" / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    return folder


def copy_of(name: str, destination: Path) -> Path:
    """Copy one entry of reward_model_dir() into destination (to damage it safely)."""
    source = reward_model_dir() / name
    target = destination / name
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)
    return target


def make_images(count: int = 5, size=(160, 200), seed: int = 0) -> torch.Tensor:
    """[count, H, W, 3] float images in 0..1 with structure (gradients, blobs, noise)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    y = torch.linspace(0, 1, height).view(height, 1, 1)
    x = torch.linspace(0, 1, width).view(1, width, 1)
    images = []
    for index in range(count):
        phase = torch.rand(3, generator=generator) * 6.28
        freq = 1 + torch.rand(3, generator=generator) * 6
        base = 0.5 + 0.4 * torch.sin(freq * (x + index * y) * 3.14 + phase)
        noise = torch.rand(height, width, 3, generator=generator) * 0.2
        images.append((base + noise - 0.1).clamp(0, 1))
    return torch.stack(images)


def to_pil(image: torch.Tensor):
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def quantised(images: torch.Tensor) -> torch.Tensor:
    """Round to uint8 levels, as a PIL round trip would."""
    return (images.clamp(0, 1) * 255).round() / 255
