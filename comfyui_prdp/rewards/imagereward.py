"""ImageReward (Xu et al., 2023), as its authors compute it, without the ImageReward package.

The prompt (BERT uncased WordPiece, padded/truncated to 35 tokens) goes through BLIP's BERT
text encoder, which cross-attends to the BLIP ViT-L/16 image tokens (224 px, CLIP
preprocessing); the first token's hidden state goes through the same MLP head as the LAION
aesthetic predictor; score = (mlp - 0.16717362830052426) / 1.0333394966054072.
Files: `ImageReward.pt` (THUDM/ImageReward) and the vocabulary of bert-base-uncased
(a folder `bert-base-uncased/` holding vocab.txt). The `image-reward` pip package is not used
(it does not import with transformers 5 and pins old timm); its checkpoint loads into the
module definitions of blip.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .aesthetic import AestheticMLP
from .registry import register_reward
from .blip import (
    BlipTextEncoder, BlipVisionTransformer, text_config_from_state, vision_config_from_state,
)
from .clip_preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from .loading import (
    RewardModelFileError, RewardOptions, cached_model, dtype_name, freeze, load_weights_into,
    read_state_dict, reward_factory, skip_weight_init,
)
from .model_files import ModelFiles
from .model_reward import ModelReward

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
PROMPT_TOKENS = 35

IMAGEREWARD = ModelFiles(label="ImageReward checkpoint", local_names=("ImageReward.pt",),
                         hf_repo="THUDM/ImageReward", hf_filename="ImageReward.pt")
BERT_VOCABULARY = ModelFiles(
    label="ImageReward's BERT tokenizer (bert-base-uncased)",
    local_names=("bert-base-uncased",),
    hf_repo="google-bert/bert-base-uncased",
    is_dir=True,
    required_files=("vocab.txt",),
    needs_weights=False,
    download_patterns=("vocab.txt", "tokenizer_config.json", "tokenizer.json"),
    needs="vocab.txt (tokenizer_config.json optional)",
)
_EXPECTED = "an ImageReward checkpoint (blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*)"
_REQUIRED = ("blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed",
             "blip.text_encoder.embeddings.word_embeddings.weight", "mlp.layers.0.weight")


class ImageRewardModel(nn.Module):
    """BLIP's two towers plus the MLP head, named as in ImageReward.pt."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        super().__init__()
        vision = vision_config_from_state(_strip(state, "blip.visual_encoder."))
        text = text_config_from_state(_strip(state, "blip.text_encoder."))
        self.blip = nn.Module()
        self.blip.visual_encoder = BlipVisionTransformer(vision)
        self.blip.text_encoder = BlipTextEncoder(text)
        self.mlp = AestheticMLP(text.hidden)

    @property
    def image_size(self) -> int:
        return self.blip.visual_encoder.config.image_size

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised ImageReward scores, float32 [B]."""
        image_tokens = self.blip.visual_encoder(pixels)
        hidden = self.blip.text_encoder(input_ids, attention_mask, image_tokens)
        raw = self.mlp(hidden[:, 0, :].float()).squeeze(-1)
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_imagereward(path: Path, dtype: torch.dtype) -> ImageRewardModel:
    """The checkpoint in our modules; backbone in `dtype`, head in fp32; cached per file and dtype."""
    def build() -> ImageRewardModel:
        state = read_state_dict(path, _EXPECTED)
        absent = [key for key in _REQUIRED if key not in state]
        if absent:
            raise RewardModelFileError(
                f"{path} is not {_EXPECTED}: it lacks {', '.join(absent)} (found keys like "
                f"{', '.join(list(state)[:3])}).")
        try:
            with skip_weight_init():  # every weight is loaded below (missing keys are an error)
                model = ImageRewardModel(state)
        except (KeyError, ValueError, IndexError) as error:
            raise RewardModelFileError(f"{path} is not {_EXPECTED}: {error}") from None
        load_weights_into(model, state, path, _EXPECTED)
        freeze(model)
        model.blip.to(dtype=dtype)
        return model

    return cached_model(("imagereward", str(path), dtype_name(dtype)), build)


def load_bert_tokenizer(folder: Path) -> Callable[[List[str]], Tuple[torch.Tensor, torch.Tensor]]:
    """prompts -> (input_ids, attention_mask), [B, 35] each, as ImageReward tokenises."""
    def build():
        from transformers import BertTokenizer

        try:
            return BertTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as error:  # noqa: BLE001
            raise RewardModelFileError(
                f"could not read the BERT vocabulary in {folder}: {type(error).__name__}: "
                f"{str(error)[:200]}; expected bert-base-uncased's vocab.txt.") from None

    hf = cached_model(("bert-tokenizer", str(folder)), build)

    def tokenize(prompts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        out = hf(list(prompts), padding="max_length", truncation=True, max_length=PROMPT_TOKENS,
                 return_tensors="pt")
        return out.input_ids, out.attention_mask

    return tokenize


class ImageRewardReward(ModelReward):
    name = "imagereward"

    def __init__(self, checkpoint: Path, vocabulary: Path, **options):
        super().__init__(**options)
        self.model = load_imagereward(checkpoint, self.dtype)
        self.tokenize = load_bert_tokenizer(vocabulary)
        ids, _ = self.tokenize(["a test prompt"])
        vocab_size = self.model.blip.text_encoder.config.vocab_size
        if int(ids.max()) >= vocab_size:
            raise RewardModelFileError(
                f"the vocabulary in {vocabulary} does not fit {checkpoint} (token ids up to "
                f"{int(ids.max())}, the model knows {vocab_size}); use bert-base-uncased's vocab.txt.")

    def modules(self) -> List[nn.Module]:
        return [self.model]

    def _score_batch(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        size = self.model.image_size
        pixels = clip_preprocess(images, size, CLIP_MEAN, CLIP_STD).to(self.dtype)
        ids, mask = self.tokenize(prompts)
        return self.model(pixels, ids.to(self.device), mask.to(self.device))


@reward_factory
def create_imagereward(path: Optional[str] = None, *, tokenizer_path: Optional[str] = None,
                       options: RewardOptions) -> ImageRewardReward:
    """path: ImageReward.pt; tokenizer_path: a folder with bert-base-uncased's vocab.txt."""
    return ImageRewardReward(options.locate(IMAGEREWARD, path),
                             options.locate(BERT_VOCABULARY, tokenizer_path), **options.scoring)


register_reward("imagereward", create_imagereward)
