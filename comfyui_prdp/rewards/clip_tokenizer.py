"""CLIP text tokenisation: prompts -> input ids [B, 77] (start token, text, end token, padding).

Every CLIP reward here uses OpenAI's BPE vocabulary, which open_clip ships inside its wheel, so
tokenisation never needs a download: a model folder's own tokenizer files are used when
present, open_clip's tokenizer otherwise (the ids are identical; only padding ids differ, and
CLIP's causal text encoder never looks past the end token).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, List, Optional

import torch

logger = logging.getLogger(__name__)

CONTEXT_LENGTH = 77
#: special tokens as the Hugging Face CLIP tokenizer names them (open_clip 3.x renamed them)
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")

Tokenizer = Callable[[List[str]], torch.Tensor]


def open_clip_tokenizer(arch: Optional[str] = None) -> Tokenizer:
    """open_clip's tokenizer for `arch` (its bundled BPE for every OpenAI-vocabulary model)."""
    import open_clip

    if arch is not None:
        return open_clip.get_tokenizer(arch)
    return open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT_LENGTH)


def hf_tokenizer_from_folder(folder: Path) -> Optional[Tokenizer]:
    """The tokenizer saved in a transformers model folder, or None if it has none."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

    def tokenize(prompts: List[str]) -> torch.Tensor:
        return hf(list(prompts), padding="max_length", truncation=True,
                  max_length=CONTEXT_LENGTH, return_tensors="pt").input_ids

    return tokenize


def clip_tokenizer_for_folder(folder: Path) -> Tokenizer:
    """A transformers CLIP folder's own tokenizer if it has one, else open_clip's (same ids)."""
    tokenizer = hf_tokenizer_from_folder(folder)
    if tokenizer is None:
        logger.info("%s has no tokenizer files; using open_clip's bundled CLIP vocabulary", folder)
        tokenizer = open_clip_tokenizer()
    return tokenizer


def build_hf_clip_tokenizer():
    """A transformers CLIPTokenizer built from open_clip's bundled BPE vocabulary (no download),
    on transformers 4.x and 5.x alike (tokenizer_offline). It reproduces open_clip's ids;
    `save_pretrained(folder)` next to a CLIPModel makes the folder self-contained."""
    from ..models.tokenizer_offline import offline_clip_tokenizer

    return offline_clip_tokenizer()
