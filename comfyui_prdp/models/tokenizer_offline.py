"""A CLIP tokenizer built offline from the BPE vocabulary that open_clip ships in its wheel.

Stable Diffusion's tokenizer is OpenAI CLIP's BPE (49,408 tokens). open_clip bundles the same
vocabulary, so a `transformers.CLIPTokenizer` that reproduces its ids exactly can be built with
no download. Pitfalls handled here: open_clip names the special tokens `<start_of_text>` /
`<end_of_text>` (renamed to CLIP's `<|startoftext|>` / `<|endoftext|>` so they keep ids
49406/49407); transformers 5 takes `vocab=` / `merges=` objects while transformers 4 (which
pyproject allows) only reads `vocab.json` / `merges.txt` files, so on 4.x the vocabulary is
written to a temporary folder and loaded from there; `model_max_length` must be 77 or
diffusers' truncation overflows.
"""
from __future__ import annotations

import functools
import gzip
import inspect
import json
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

CONTEXT_LENGTH = 77
START_ID, END_ID = 49406, 49407
_SPECIAL_RENAMES = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
#: the header line of a merges.txt (transformers 4 skips the first line of the file)
_MERGES_HEADER = "#version: 0.2"


@functools.lru_cache(maxsize=1)
def clip_bpe_vocab_and_merges() -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """CLIP's vocabulary (token -> id) and BPE merges, read from open_clip's bundled file."""
    try:
        from open_clip.tokenizer import SimpleTokenizer, default_bpe
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the offline CLIP tokenizer needs open_clip's bundled BPE vocabulary: "
            "pip install open_clip_torch") from error
    vocab = {_SPECIAL_RENAMES.get(token, token): index
             for token, index in SimpleTokenizer(bpe_path=default_bpe()).encoder.items()}
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    # the same slice open_clip uses: skip the header, keep 49152 - 256 - 2 merges
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    return vocab, merges


def takes_vocab_objects(tokenizer_class) -> bool:
    """Whether the constructor takes the vocabulary as objects (`vocab=`, transformers 5) rather
    than as file paths (`vocab_file=`, transformers 4)."""
    return "vocab" in inspect.signature(tokenizer_class.__init__).parameters


def clip_tokenizer_from_objects(tokenizer_class):
    """The tokenizer built from the vocabulary in memory (transformers 5)."""
    vocab, merges = clip_bpe_vocab_and_merges()
    return tokenizer_class(vocab=dict(vocab), merges=list(merges), model_max_length=CONTEXT_LENGTH)


def clip_tokenizer_from_files(tokenizer_class):
    """The tokenizer loaded from vocab.json / merges.txt written to a temporary folder
    (`from_pretrained` reads those files on transformers 4 and 5 alike)."""
    vocab, merges = clip_bpe_vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="prdp-clip-tokenizer-") as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = [_MERGES_HEADER] + [" ".join(pair) for pair in merges]
        (Path(folder) / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return tokenizer_class.from_pretrained(folder, model_max_length=CONTEXT_LENGTH, local_files_only=True)


def offline_clip_tokenizer(tokenizer_class=None):
    """A `transformers.CLIPTokenizer` (or `tokenizer_class`) equal to SD's
    (openai/clip-vit-large-patch14) one, built the way the installed transformers takes it."""
    if tokenizer_class is None:
        from transformers import CLIPTokenizer as tokenizer_class
    build = clip_tokenizer_from_objects if takes_vocab_objects(tokenizer_class) else clip_tokenizer_from_files
    return checked_special_ids(build(tokenizer_class))


def checked_special_ids(tokenizer):
    """`tokenizer`, or RuntimeError when its start/end ids are not CLIP's."""
    if tokenizer.bos_token_id != START_ID or tokenizer.eos_token_id != END_ID:
        raise RuntimeError(
            f"offline CLIP tokenizer has special ids {tokenizer.bos_token_id}/{tokenizer.eos_token_id}, "
            f"expected {START_ID}/{END_ID}: the installed transformers/open_clip versions disagree")
    return tokenizer
