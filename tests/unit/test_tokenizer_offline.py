"""The offline CLIP tokenizer on transformers 4 and 5 (pyproject allows >= 4.40).

transformers 5's CLIPTokenizer takes the vocabulary as objects (`vocab=`, `merges=`); 4.x's only
reads `vocab.json` / `merges.txt` (its constructor is `(vocab_file, merges_file, ...)`), and the
tokenizer used to be built the 5.x way only: TypeError on 4.x. These tests run on the installed
transformers and exercise the 4.x path either way: through a tokenizer class with 4.x's
constructor that reads the files as 4.x does (skipping merges.txt's header line). The reference
ids are open_clip's own tokenizer (OpenAI's BPE, read independently of the code under test).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
SimpleTokenizer = pytest.importorskip("open_clip.tokenizer").SimpleTokenizer

from comfyui_prdp.models import tokenizer_offline  # noqa: E402

PROMPTS = [
    "a photo of a cat",
    "Ünïcödé café, naïve — résumé!!",
    "it's a dog's life; we'll see 12345 " + "word " * 100,      # longer than 77 tokens: truncated
    "  several   spaces\tand\nnewlines  ",
]


def _file_only_tokenizer_class():
    """A CLIPTokenizer whose constructor takes only file paths and reads them itself, as
    transformers 4's does (on 4.x: the installed class itself)."""
    real = transformers.CLIPTokenizer
    if not tokenizer_offline.takes_vocab_objects(real):
        return real

    class FileOnlyCLIPTokenizer(real):
        def __init__(self, vocab_file=None, merges_file=None, **kwargs):
            kwargs.pop("vocab", None), kwargs.pop("merges", None)      # read the files, as 4.x does
            vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
            lines = Path(merges_file).read_text(encoding="utf-8").strip().split("\n")[1:]   # 4.x skips line 1
            super().__init__(vocab=vocab, merges=[tuple(line.split()) for line in lines], **kwargs)

    return FileOnlyCLIPTokenizer


def _ids(tokenizer) -> torch.Tensor:
    return tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids


def _assert_open_clip_ids(tokenizer) -> None:
    reference = SimpleTokenizer(context_length=77)(PROMPTS)     # pads with 0; the tokenizer pads with 49407
    ids = _ids(tokenizer)
    assert ids.shape == reference.shape == (len(PROMPTS), 77)
    for row, expected in zip(ids, reference):
        length = int((expected != 0).sum())
        assert row[:length].tolist() == expected[:length].tolist()
        assert (row[length:] == tokenizer_offline.END_ID).all()
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)


def test_a_tokenizer_with_the_transformers_4_constructor_is_built_from_files():
    file_only = _file_only_tokenizer_class()
    assert not tokenizer_offline.takes_vocab_objects(file_only)
    tokenizer = tokenizer_offline.offline_clip_tokenizer(file_only)
    assert isinstance(tokenizer, file_only)
    _assert_open_clip_ids(tokenizer)


def test_the_installed_transformers_gives_open_clips_ids():
    _assert_open_clip_ids(tokenizer_offline.offline_clip_tokenizer())


def test_the_files_left_behind_are_none(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    tokenizer_offline.clip_tokenizer_from_files(_file_only_tokenizer_class())
    assert list(tmp_path.iterdir()) == []
