"""A CLIP tokenizer built offline from the BPE vocabulary that open_clip ships in its wheel.

Stable Diffusion's tokenizer is OpenAI CLIP's BPE (49,408 tokens). open_clip bundles the same
vocabulary, so a `transformers.CLIPTokenizer` that reproduces its ids exactly can be built with
no download. Pitfalls handled here: open_clip names the special tokens `<start_of_text>` /
`<end_of_text>` (renamed to CLIP's `<|startoftext|>` / `<|endoftext|>` so they keep ids
49406/49407), transformers 5 takes `vocab=` / `merges=` objects, and `model_max_length` must
be 77 or diffusers' truncation overflows.
"""
from __future__ import annotations

import functools
import gzip
from typing import Dict, List, Tuple

CONTEXT_LENGTH = 77
_SPECIAL_RENAMES = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


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


def offline_clip_tokenizer():
    """A `transformers.CLIPTokenizer` equal to SD's (openai/clip-vit-large-patch14) one."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CONTEXT_LENGTH)
    if tokenizer.bos_token_id != 49406 or tokenizer.eos_token_id != 49407:
        raise RuntimeError(
            f"offline CLIP tokenizer has special ids {tokenizer.bos_token_id}/{tokenizer.eos_token_id}, "
            "expected 49406/49407: the installed transformers/open_clip versions disagree")
    return tokenizer
