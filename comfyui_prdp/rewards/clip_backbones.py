"""CLIP backbones behind one small interface, loaded once per (kind, file, dtype).

- `load_transformers_clip(folder)`: a transformers CLIPModel folder (PickScore, OpenAI CLIP).
- `load_open_clip(arch, weights)`: an open_clip architecture plus a weight file (HPSv2 keeps
  its weights under a "state_dict" key).
open_clip and transformers are imported only when a model is loaded.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import List, Sequence

import torch

from .clip_preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from .clip_tokenizer import Tokenizer, clip_tokenizer_for_folder, open_clip_tokenizer
from .loading import (
    RewardModelFileError, cached_model, dtype_name, freeze, load_weights_into, read_state_dict,
    skip_weight_init,
)


class ClipBackbone:
    """A CLIP model: projected image and text features, logit scale, preprocessing settings."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, image_size: int,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """[B, H, W, 3] 0..1 -> model input [B, 3, S, S] on the model's device and dtype."""
        pixels = clip_preprocess(images.to(self.device), self.image_size, self.mean, self.std)
        return pixels.to(self.dtype)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Projected (not normalised) float32 image embeddings [B, D]."""
        raise NotImplementedError

    def text_features(self, prompts: List[str]) -> torch.Tensor:
        """Projected (not normalised) float32 text embeddings [B, D]."""
        raise NotImplementedError

    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale) as a float32 scalar."""
        return self.model.logit_scale.detach().float().exp().reshape(())


class TransformersClip(ClipBackbone):
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=self.pixels(images))
        return _pooled(out).float()

    def text_features(self, prompts: List[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts)).to(self.device)
        out = self.model.get_text_features(input_ids=ids)
        return _pooled(out).float()


class OpenClip(ClipBackbone):
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.pixels(images)).float()

    def text_features(self, prompts: List[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(ids).float()


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns an output object (projected embedding in pooler_output); 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# --- loaders ----------------------------------------------------------------------------------

def load_transformers_clip(folder: Path, dtype: torch.dtype, expected: str) -> TransformersClip:
    """A CLIPModel folder (config.json + weights), cached per (folder, dtype)."""
    folder = Path(folder)
    key = ("transformers-clip", str(folder), dtype_name(dtype))
    return cached_model(key, lambda: _build_transformers_clip(folder, dtype, expected))


def _build_transformers_clip(folder: Path, dtype: torch.dtype, expected: str) -> TransformersClip:
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RewardModelFileError(
            f"could not read {config_file} as the config of {expected}: {error}") from None
    if config.get("model_type") != "clip":
        raise RewardModelFileError(
            f"{config_file} describes a {config.get('model_type')!r} model; expected {expected} "
            "(a transformers CLIPModel, model_type 'clip').")
    from transformers import CLIPModel

    try:
        model, info = CLIPModel.from_pretrained(
            str(folder), dtype=dtype, local_files_only=True, output_loading_info=True)
    except Exception as error:  # noqa: BLE001  (safetensors/pickle/OS errors: all "bad file")
        message = str(error).splitlines()[0][:300] if str(error) else ""
        raise RewardModelFileError(
            f"could not load the weights in {folder} as {expected}: {type(error).__name__}: "
            f"{message}. The weight file is probably incomplete or corrupt: download it again."
        ) from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise RewardModelFileError(
            f"the weights in {folder} are not {expected}: {len(missing)} tensors missing "
            f"(e.g. {', '.join(sorted(missing)[:3])}).")
    if info.get("mismatched_keys"):
        raise RewardModelFileError(
            f"the weights in {folder} do not match its config.json ({expected}): "
            f"{len(info['mismatched_keys'])} tensors have other shapes.")
    freeze(model)
    mean, std = _folder_normalisation(folder)
    return TransformersClip(model, clip_tokenizer_for_folder(folder),
                            model.config.vision_config.image_size, mean, std)


def _folder_normalisation(folder: Path):
    """image_mean/image_std from preprocessor_config.json when present, else CLIP's."""
    try:
        pre = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
        return tuple(pre.get("image_mean", CLIP_MEAN)), tuple(pre.get("image_std", CLIP_STD))
    except (OSError, ValueError):
        return CLIP_MEAN, CLIP_STD


def load_open_clip(arch: str, weights: Path, dtype: torch.dtype, expected: str) -> OpenClip:
    """open_clip `arch` with the weights in a file, cached per (arch, file, dtype)."""
    weights = Path(weights)
    key = ("open-clip", arch, str(weights), dtype_name(dtype))
    return cached_model(key, lambda: _build_open_clip(arch, weights, dtype, expected))


def _build_open_clip(arch: str, weights: Path, dtype: torch.dtype, expected: str) -> OpenClip:
    import open_clip
    from open_clip.model import get_model_preprocess_cfg

    if arch not in open_clip.list_models():
        raise ValueError(f"open_clip has no architecture {arch!r} (register a config with "
                         "open_clip.add_model_config, or use e.g. ViT-H-14)")
    state = read_state_dict(weights, expected)  # cheap failure before building a big model
    with skip_weight_init(), _quiet_random_init_warning():
        # every weight is overwritten below (missing keys are an error)
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
    own = model.state_dict()
    if "logit_scale" in state and "logit_scale" in own:
        state["logit_scale"] = state["logit_scale"].reshape(own["logit_scale"].shape)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids") or k in own}
    load_weights_into(model, state, weights, expected, ignore_missing=("logit_bias",))
    freeze(model, dtype)
    cfg = get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return OpenClip(model, open_clip_tokenizer(arch), size,
                    cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD))


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning():
    """open_clip warns "Model initialized randomly" before we load the weights: drop that line."""
    root = logging.getLogger()
    dropper = _DropRandomInitWarning()
    root.addFilter(dropper)
    try:
        yield
    finally:
        root.removeFilter(dropper)
