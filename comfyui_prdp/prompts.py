"""Prompt lists: text typed into a node, and prompt files of any size.

Files come in the formats large prompt sets are distributed in:

- text (`.txt` and any other name): one prompt per line, blank lines and '#' comments skipped;
- JSON lines (`.jsonl`, `.ndjson`): one object per line with a prompt field, or one string;
- a JSON list (`.json`): of objects with a prompt field (HPDv2, Pick-a-Pic exports) or of strings
  (a `.json` file whose first character is not '[' is read as JSON lines);
- CSV (`.csv`, `.tsv`) with a header row: the prompt column.

The field (column) is `field` when given, else the first of DEFAULT_FIELDS the first record
has (any case), else a CSV's only column. A file is scanned once: every record is decoded and
checked, and only the byte span of each prompt is kept (`PromptSet`, 16 bytes per prompt; the
prompts themselves are read back from the file when drawn), so memory stays small for millions
of prompts. Anything that is not a usable prompt (binary data, a line that is not UTF-8, a
record without the field, an over-long prompt) is refused with PromptTextError naming the file,
the line and the fix, before any training.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import mmap
import os
import re
from array import array
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

#: CLIP reads 77 tokens (a few hundred characters); a longer line is not a prompt
MAX_PROMPT_CHARS = 2000
#: a prompt file larger than this is not a list of prompts (1M prompts are ~100 MB)
MAX_FILE_BYTES = 256 * 2 ** 20
#: prompt fields looked for, in this order, when none is named (HPDv2/DiffusionDB: prompt,
#: Pick-a-Pic/COCO: caption)
DEFAULT_FIELDS = ("prompt", "caption", "text")
FORMATS = ("auto", "text", "jsonl", "json", "csv", "tsv")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
_BOM = b"\xef\xbb\xbf"
# the tokens that matter to the structure of a JSON list: whole strings and punctuation
_JSON_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.S)


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
        _check_length(line, f"{source} line {number}")
        prompts.append(line)
    return prompts


def _check_length(prompt: str, where: str) -> None:
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptTextError(f"{where} is {len(prompt)} characters long (at most {MAX_PROMPT_CHARS}): put one "
                              "prompt per line (record)")


# ----------------------------------------------------------------------------- the lazy set
class PromptSet(Sequence):
    """The prompts of a scanned file, read back by index (see the module docstring).

    Indexing re-reads one record; iterating reads the file once in order. The file must not
    change after the scan: a change is refused (PromptTextError) rather than training on other
    prompts than the run recorded."""

    def __init__(self, path: Path, name: str, kind: str, field: Optional[Union[str, int]],
                 starts: array, ends: array, signature: Tuple[int, int], delimiter: str = ","):
        self.path, self.name, self.kind, self.field = Path(path), name, kind, field
        self._starts, self._ends = starts, ends
        self._signature = signature
        self._delimiter = delimiter

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"prompt {index} of {len(self)}")
        self._check_unchanged()
        with open(self.path, "rb") as handle:
            return self._read(handle, index)

    def __iter__(self) -> Iterator[str]:
        self._check_unchanged()
        with open(self.path, "rb") as handle:
            for index in range(len(self)):
                yield self._read(handle, index)

    def __repr__(self) -> str:
        return f"PromptSet({self.name!r}, {len(self)} prompts, {self.kind})"

    def subset(self, indices: Sequence[int]) -> "PromptSet":
        """A PromptSet of the prompts at `indices` (in that order), sharing the file."""
        starts = array("q", (self._starts[i] for i in indices))
        ends = array("q", (self._ends[i] for i in indices))
        return PromptSet(self.path, self.name, self.kind, self.field, starts, ends, self._signature,
                         self._delimiter)

    def sha256(self) -> str:
        """sha256 of the prompts joined by newlines (equal to hashing "\\n".join(list(self)))."""
        return prompts_sha256(self)

    def _read(self, handle, index: int) -> str:
        start, end = self._starts[index], self._ends[index]
        handle.seek(start)
        return _record_prompt(handle.read(end - start), self.kind, self.field, self._delimiter)

    def _check_unchanged(self) -> None:
        try:
            info = os.stat(self.path)
        except OSError:
            info = None
        if info is None or (info.st_size, info.st_mtime_ns) != self._signature:
            raise PromptTextError(f"prompt file {self.name} changed (or vanished) after it was read; keep it "
                                  "unchanged while training, or start again to read the new version")


def prompts_sha256(prompts: Sequence[str]) -> str:
    """sha256 of "\\n".join(prompts), computed without joining (for large PromptSets)."""
    digest = hashlib.sha256()
    for index, prompt in enumerate(prompts):
        if index:
            digest.update(b"\n")
        digest.update(prompt.encode("utf-8"))
    return digest.hexdigest()


def _record_prompt(data: bytes, kind: str, field, delimiter: str) -> str:
    """The prompt of one record's bytes, as the scan checked it."""
    text = data.decode("utf-8")
    if kind == "text":
        return text.strip()
    if kind in ("jsonl", "json"):
        value = json.loads(text)
        return (value if field is None else value[field]).strip()
    row = next(csv.reader(io.StringIO(text), delimiter=delimiter))
    return row[field].strip()


# ----------------------------------------------------------------------------- opening files
def open_prompt_file(path: Path, name: Optional[str] = None, field: Optional[str] = None,
                     kind: str = "auto", allow_empty: bool = False) -> PromptSet:
    """Scan a prompt file (see the module docstring) into a PromptSet.

    `name` is how messages call the file (default: its path); `field` the JSON field or CSV
    column of the prompt; `kind` one of FORMATS. Raises FileNotFoundError or PromptTextError
    (an empty file too, unless allow_empty)."""
    path = Path(path)
    shown = str(path) if name is None else name
    if kind not in FORMATS:
        raise PromptTextError(f"prompt format {kind!r} is not known; use one of: {', '.join(FORMATS)}")
    if not path.exists():
        raise FileNotFoundError(f"prompt file {shown} not found; give a text file with one prompt per line "
                                "(or .jsonl, .json, .csv)")
    if not path.is_file():
        raise PromptTextError(f"prompt file {shown} is not a regular file (a folder or device); give a text "
                              "file with one prompt per line")
    info = os.stat(path)
    if info.st_size > MAX_FILE_BYTES:
        raise PromptTextError(f"prompt file {shown} is {info.st_size / 2 ** 20:.0f} MiB (at most "
                              f"{MAX_FILE_BYTES // 2 ** 20} MiB): is it really a list of prompts?")
    scan = _Scan(path, shown, field)
    with open(path, "rb") as handle:
        scan.run(handle, _format_of(path, handle.read(4096), kind), info.st_size)
    if not len(scan.starts) and not allow_empty:
        raise PromptTextError(f"prompt file {shown} has no prompts; write one prompt per line (or one record "
                              "per line with a prompt field)")
    return PromptSet(path, shown, scan.kind, scan.field, scan.starts, scan.ends,
                     (info.st_size, info.st_mtime_ns), scan.delimiter)


def read_prompt_file(path: Path, name: Optional[str] = None, field: Optional[str] = None) -> List[str]:
    """The prompts of a prompt file as a list ([] for a file with none); FileNotFoundError or
    PromptTextError with the fix. For large files prefer open_prompt_file (lazy)."""
    return list(open_prompt_file(path, name=name, field=field, allow_empty=True))


def _format_of(path: Path, head: bytes, kind: str) -> str:
    """The format `kind` names, or the one the suffix (and, for .json, the first byte) says."""
    if kind != "auto":
        return kind
    guess = _SUFFIX_FORMATS.get(path.suffix.lower(), "text")
    if guess == "json":
        first = re.search(rb"\S", head.lstrip(_BOM))
        return "json" if first is not None and first.group() == b"[" else "jsonl"
    return guess


class _Scan:
    """One pass over a file's bytes: every record checked, its prompt's byte span kept."""

    def __init__(self, path: Path, shown: str, field: Optional[str]):
        self.path, self.shown = path, shown
        self.field: Optional[Union[str, int]] = field
        self.field_given = field is not None
        self.kind = "text"
        self.shape: Optional[str] = None     # JSON records: all "string" or all "object"
        self.delimiter = ","
        self.starts, self.ends = array("q"), array("q")

    def fail(self, line: int, problem: str, fix: str) -> PromptTextError:
        return PromptTextError(f"prompt file {self.shown} line {line} {problem}; {fix}")

    def run(self, handle, kind: str, size: int) -> None:
        """Scan the open file: line by line (text, JSON lines, CSV), or through a read-only
        memory map (a JSON list, whose records need not follow lines)."""
        self.kind = kind
        handle.seek(0)
        if kind == "json":
            if size:
                with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                    self._no_nul(data.find(b"\x00") == -1, lambda: _newlines(data, 0, data.find(b"\x00")) + 1)
                    self._json_list(data, len(_BOM) if data[:3] == _BOM else 0)
            return
        lines = self._checked_lines(handle)
        if kind == "text":
            self._text(lines)
        elif kind == "jsonl":
            self._jsonl(lines)
        else:
            self.delimiter = "\t" if kind == "tsv" else ","
            self._csv(lines)

    def _no_nul(self, ok: bool, line) -> None:
        if not ok:
            raise PromptTextError(f"prompt file {self.shown} contains NUL bytes (line {line()}), so it is a binary "
                                  "file: give a UTF-8 text file with one prompt per line")

    def _checked_lines(self, handle) -> Iterator[Tuple[int, int, bytes, bytes]]:
        """_lines with NUL bytes refused."""
        for number, start, content, raw in _lines(handle):
            self._no_nul(b"\x00" not in raw, lambda: number)
            yield number, start, content, raw

    # --- the formats ---------------------------------------------------------------------
    def _text(self, lines) -> None:
        for number, start, content, _ in lines:
            line = self._decode(content, number).strip()
            if line and not line.startswith("#"):
                _check_length(line, f"prompt file {self.shown} line {number}")
                self._keep(start, start + len(content))

    def _jsonl(self, lines) -> None:
        for number, start, content, _ in lines:
            text = self._decode(content, number)
            if text.strip():
                self._record(self._parse_json(text, number), number)
                self._keep(start, start + len(content))

    def _json_list(self, data, begin: int) -> None:
        depth, newline_pos, lines, element_start = 0, begin, 1, None
        last = None
        for match in _JSON_TOKENS.finditer(data, begin):
            token = match.group()
            if token[:1] == b'"':
                continue
            position = match.start()
            if depth == 0:
                if token != b"[" or element_start is not None or data[begin:position].strip():
                    raise self.fail(lines + _newlines(data, newline_pos, position), "does not start a JSON list",
                                    "a .json prompt file is a list: [\"a cat\", ...] or [{\"prompt\": ...}, ...]")
                element_start = position + 1
            if token in (b"[", b"{"):
                depth += 1
            elif token in (b"]", b"}"):
                depth -= 1
            if (token == b"," and depth == 1) or (token == b"]" and depth == 0):
                lines += _newlines(data, newline_pos, element_start)
                newline_pos = element_start
                self._json_element(data, element_start, position, lines, allow_blank=token == b"]"
                                   and not len(self.starts))
                element_start = position + 1
                if depth == 0:
                    last = position
                    break
        if last is None:
            raise self.fail(_newlines(data, begin, len(data)) + 1, "ends before the JSON list is closed",
                            "the file is truncated or not a JSON list: check its last line")
        if data[last + 1:].strip():
            line = _newlines(data, 0, last) + 1
            raise self.fail(line, "has text after the end of the JSON list", "a .json prompt file holds one list")

    def _json_element(self, data, start: int, end: int, line: int, allow_blank: bool) -> None:
        raw = data[start:end]
        skipped = len(raw) - len(raw.lstrip())
        line += raw.count(b"\n", 0, skipped)
        text = self._decode(raw, line)
        if not text.strip():
            if allow_blank:
                return          # []: an empty list
            raise self.fail(line, "has an empty element in the JSON list", "remove the extra comma")
        self._record(self._parse_json(text, line), line)
        self._keep(start, end)

    def _csv(self, lines) -> None:
        header = None
        for number, start, record in _csv_records(lines, self.shown):
            text = self._decode(record, number)
            if not text.strip():
                continue
            try:
                row = next(csv.reader(io.StringIO(text), delimiter=self.delimiter))
            except csv.Error as error:
                raise self.fail(number, f"is not a CSV record ({error})", "check its quotes") from None
            if header is None:
                header = row
                self.field = self._csv_column(header, number)
                continue
            if len(row) <= self.field:
                raise self.fail(number, f"has {len(row)} column(s), the header {len(header)}",
                                f"give every row a {header[self.field]!r} column")
            self._check_prompt(row[self.field], number, f"column {header[self.field]!r}")
            self._keep(start, start + len(record))

    # --- records ------------------------------------------------------------------------
    def _decode(self, raw: bytes, line: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise PromptTextError(f"prompt file {self.shown} line {line} is not UTF-8 text (bad byte at column "
                                  f"{error.start + 1}); save the file as UTF-8") from None

    def _parse_json(self, text: str, line: int):
        try:
            return json.loads(text)
        except ValueError as error:
            raise self.fail(line, f"is not valid JSON ({error.msg})",
                            "write one JSON object (or string) per record") from None

    def _record(self, value, line: int) -> None:
        shape = "string" if isinstance(value, str) else "object"
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            raise self.fail(line, f"is a{'n' if shape == 'object' else ''} {shape}, the records before it "
                            f"{self.shape}s", "give every record the same form")
        if isinstance(value, str):
            if self.field_given:
                raise self.fail(line, f"is a string, not an object with the field {self.field!r}",
                                "leave out the prompt field for a list of strings")
            self.field = None
            self._check_prompt(value, line, "the prompt")
            return
        if not isinstance(value, dict):
            raise self.fail(line, f"is a JSON {type(value).__name__}, not an object or a string",
                            f"give each record a {self._field_hint()} field")
        if self.field is None:
            self.field = self._detect_field(list(value), line)
        if self.field not in value:
            raise self.fail(line, f"has no {self.field!r} field (it has {_names(value)})",
                            "add it, or name the prompt field (--prompt-field)")
        prompt = value[self.field]
        if not isinstance(prompt, str):
            raise self.fail(line, f"field {self.field!r} is a {type(prompt).__name__}, not text",
                            "give each record its prompt as a string")
        self._check_prompt(prompt, line, f"field {self.field!r}")

    def _check_prompt(self, prompt: str, line: int, what: str) -> None:
        prompt = prompt.strip()
        if not prompt:
            raise self.fail(line, f"has an empty prompt ({what})", "remove the record or fill it in")
        _check_length(prompt, f"prompt file {self.shown} line {line} ({what})")

    def _detect_field(self, names: List[str], line: int) -> str:
        lowered = {name.lower(): name for name in reversed(names)}
        for wanted in DEFAULT_FIELDS:
            if wanted in lowered:
                return lowered[wanted]
        raise self.fail(line, f"has no prompt field (it has {_names(names)})",
                        f"name the field that holds the prompt (--prompt-field), e.g. {names[0]!r}"
                        if names else "give each record a 'prompt' field")

    def _csv_column(self, header: List[str], line: int) -> int:
        if self.field_given:
            if self.field not in header:
                raise self.fail(line, f"(the header) has no column {self.field!r} (it has {_names(header)})",
                                "name one of those columns")
            return header.index(self.field)
        if len(header) == 1:
            return 0
        return header.index(self._detect_field(header, line))

    def _field_hint(self) -> str:
        return repr(self.field) if self.field is not None else "'prompt'"

    def _keep(self, start: int, end: int) -> None:
        self.starts.append(start)
        self.ends.append(end)


def _names(names) -> str:
    shown = [repr(n) for n in list(names)[:8]]
    return ", ".join(shown) + (", ..." if len(names) > 8 else "") if shown else "no fields"


def _newlines(data, start: int, end: int, block: int = 1 << 20) -> int:
    """How many '\\n' bytes data[start:end] holds (an mmap has no count), read in blocks."""
    return sum(data[at:min(end, at + block)].count(b"\n") for at in range(start, end, block))


def _lines(handle) -> Iterator[Tuple[int, int, bytes, bytes]]:
    """(line number, offset of its content, content without '\\r\\n' / '\\n' (and a leading
    BOM), the raw line) of every line of a binary file, read in order."""
    position = 0
    for number, raw in enumerate(handle, start=1):
        start = position
        position += len(raw)
        content = raw[:-1] if raw.endswith(b"\n") else raw
        content = content[:-1] if content.endswith(b"\r") else content
        if number == 1 and content.startswith(_BOM):
            content, start = content[len(_BOM):], start + len(_BOM)
        yield number, start, content, raw


def _csv_records(lines, shown: str) -> Iterator[Tuple[int, int, bytes]]:
    """(first line number, offset, bytes) of each CSV record: lines joined while a quote is open
    (an odd number of '"' so far; doubled quotes inside a field keep the count even)."""
    parts: List[bytes] = []
    record_start, record_line, quotes = 0, 0, 0
    for number, start, content, raw in lines:
        if not parts:
            record_start, record_line, quotes = start, number, 0
            raw = raw[len(_BOM):] if number == 1 and raw.startswith(_BOM) else raw
        quotes += content.count(b'"')
        if quotes % 2 == 0:
            yield record_line, record_start, b"".join(parts) + content
            parts = []
        else:
            parts.append(raw)
    if parts:
        raise PromptTextError(f"prompt file {shown} line {record_line} opens a quoted CSV field that is never "
                              "closed; close the quote")
