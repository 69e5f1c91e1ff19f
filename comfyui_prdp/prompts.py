"""Prompt lists from text: one prompt per line, blank lines and '#' comments skipped.

Text that cannot be a prompt list (binary data, a line far longer than any prompt, a file
that is not UTF-8) is refused with an error naming the file, the line and the fix, instead of
being trained on silently.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

#: CLIP reads 77 tokens (a few hundred characters); a longer line is not a prompt
MAX_PROMPT_CHARS = 2000
#: a prompt file larger than this is not a prompt list (100K prompts are a few MB)
MAX_FILE_BYTES = 256 * 2 ** 20


class PromptTextError(ValueError):
    """The text is not a usable prompt list; the message says why and what to do."""


def parse_prompt_text(text: str, source: str = "prompts") -> List[str]:
    """The prompts in `text`; PromptTextError for NUL bytes or an overlong line."""
    if "\x00" in text:
        raise PromptTextError(f"{source} contains NUL bytes, so it is binary data, not prompt text: "
                              "give UTF-8 text with one prompt per line")
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_PROMPT_CHARS:
            raise PromptTextError(f"{source} line {number} is {len(line)} characters long (at most "
                                  f"{MAX_PROMPT_CHARS}): put one prompt per line")
        prompts.append(line)
    return prompts


def read_prompt_file(path: Path, name: Optional[str] = None) -> List[str]:
    """The prompts of a UTF-8 text file; FileNotFoundError or PromptTextError with the fix.
    `name` is how messages call the file (default: its path)."""
    path = Path(path)
    shown = path if name is None else name
    if not path.exists():
        raise FileNotFoundError(f"prompt file {shown} not found; give a text file with one prompt per line")
    if not path.is_file():
        raise PromptTextError(f"prompt file {shown} is not a regular file (a folder or device); give a text "
                              "file with one prompt per line")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise PromptTextError(f"prompt file {shown} is {size / 2 ** 20:.0f} MiB (at most "
                              f"{MAX_FILE_BYTES // 2 ** 20} MiB): is it really a list of prompts?")
    data = path.read_bytes()
    if b"\x00" in data:
        raise PromptTextError(f"prompt file {shown} contains NUL bytes, so it is a binary file: give a UTF-8 "
                              "text file with one prompt per line")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise PromptTextError(f"prompt file {shown} is not UTF-8 text (bad byte at offset {error.start}); "
                              "save it as UTF-8 with one prompt per line") from None
    return parse_prompt_text(text, f"prompt file {shown}")
