"""Prompt files: text, JSON lines, JSON lists and CSV, read lazily (100K lines), with errors that
name the line; the CLI takes them with --prompts/--prompt-field and the trainer draws from them."""
import csv
import hashlib
import json
import sys
import tracemalloc

import pytest

from comfyui_prdp import cli
from comfyui_prdp.models import loading as model_loading
from comfyui_prdp.prompts import PromptSet, PromptTextError, open_prompt_file, read_prompt_file
from comfyui_prdp.trainer import Trainer
from test_trainer import toy_config
from toy_backend import BrightnessReward, ToyBackend

PROMPTS = ["a cat, sitting", 'a "quoted" dog', "un café [bleu] {x}", "a fox\\slash"]


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def formats(tmp_path):
    """(file, field) for each format, every one holding PROMPTS."""
    text = tmp_path / "p.txt"
    text.write_bytes(b"\xef\xbb\xbf# a comment\r\n\r\n" + "\r\n\n".join(PROMPTS).encode() + b"\n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "prompt": p, "tags": ["]", {"}": 1}]}) + "\n\n"
                             for i, p in enumerate(PROMPTS)), encoding="utf-8")
    strings = tmp_path / "s.jsonl"
    strings.write_text("\n".join(json.dumps(p) for p in PROMPTS), encoding="utf-8")
    hpd = tmp_path / "hpd.json"   # HPDv2 test.json style: objects with more fields
    hpd.write_text(json.dumps([{"prompt": p, "image_path": [f"{i}.png"], "rank": [1, 2]}
                               for i, p in enumerate(PROMPTS)], indent=2, ensure_ascii=False), encoding="utf-8")
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(PROMPTS), encoding="utf-8")
    pick = tmp_path / "pick.json"   # a .json file that is JSON lines (Pick-a-Pic caption exports)
    pick.write_text("".join(json.dumps({"Caption": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    table = write_csv(tmp_path / "p.csv", ["id", "prompt"], [[i, p] for i, p in enumerate(PROMPTS)])
    tsv = write_csv(tmp_path / "p.tsv", ["text"], [[p] for p in PROMPTS], delimiter="\t")
    named = write_csv(tmp_path / "named.csv", ["id", "caption", "description"],
                      [[i, "not this", p] for i, p in enumerate(PROMPTS)])
    return [(text, None), (jsonl, None), (strings, None), (hpd, None), (listed, None), (pick, None),
            (table, None), (tsv, None), (named, "description")]


def test_every_format_gives_the_same_prompts(tmp_path):
    for path, field in formats(tmp_path):
        prompts = open_prompt_file(path, field=field)
        assert isinstance(prompts, PromptSet)
        assert list(prompts) == PROMPTS, path.name
        assert [prompts[i] for i in (3, 0, -1)] == [PROMPTS[3], PROMPTS[0], PROMPTS[-1]], path.name
        assert read_prompt_file(path, field=field) == PROMPTS
        assert prompts.sha256() == hashlib.sha256("\n".join(PROMPTS).encode()).hexdigest()


def test_csv_fields_with_newlines_and_quotes(tmp_path):
    rows = [["1", 'line one\nline "two", with a comma'], ["2", "plain"]]
    prompts = open_prompt_file(write_csv(tmp_path / "q.csv", ["id", "caption"], rows))
    assert list(prompts) == [rows[0][1], "plain"]
    assert prompts.field == 1
    bom = tmp_path / "bom.csv"      # Excel's UTF-8 CSV: a BOM, CRLF, a quoted field over two lines
    bom.write_bytes(b'\xef\xbb\xbfPrompt,id\r\n"a ""b""\r\nc",1\r\nd,2\r\n')
    assert list(open_prompt_file(bom)) == ['a "b"\r\nc', "d"]


def test_hundred_thousand_lines_are_indexed_not_held(tmp_path):
    n = 100_000
    path = tmp_path / "big.jsonl"
    filler = "in the style of a very detailed oil painting, golden hour light, " * 2
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps({"caption": f"prompt {i}: {filler}", "id": i}) + "\n")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        prompts = open_prompt_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(prompts) == n
    for i in (0, 1, 4_567, 77_777, n - 1):
        assert prompts[i] == f"prompt {i}: {filler}".strip()
    # the spans cost 16 bytes a prompt; the prompts themselves (~18 MB of text) are not held
    assert size > 15e6 and peak < 4e6 and peak < size / 5, (size, peak)
    picked = prompts.subset([n - 1, 5])
    assert list(picked) == [prompts[n - 1], prompts[5]]


@pytest.mark.parametrize("name, content, fragments", [
    ("empty.txt", b"", ["has no prompts"]),
    ("comments.txt", b"# only\n\n   \n", ["has no prompts"]),
    ("empty.jsonl", b"\n\n", ["has no prompts"]),
    ("empty.json", b"[ ]", ["has no prompts"]),
    ("latin1.txt", "a cat\nun caf\xe9\n".encode("latin-1"), ["line 2 is not UTF-8 text", "column 7"]),
    ("latin1.jsonl", b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n', ["line 2 is not UTF-8"]),
    ("nul.txt", b"a cat\nb\nd\x00og\n", ["NUL bytes (line 3)"]),
    ("missing.jsonl", b'{"prompt": "a"}\n\n{"text": "b", "id": 3}\n', ["line 3 has no 'prompt' field",
                                                                      "'text', 'id'", "--prompt-field"]),
    ("nofield.jsonl", b'{"id": 1, "url": "x"}\n', ["line 1 has no prompt field", "'id', 'url'"]),
    ("badjson.jsonl", b'{"prompt": "a"}\n{"prompt": "b"\n', ["line 2 is not valid JSON"]),
    ("number.jsonl", b'{"prompt": 5}\n', ["line 1 field 'prompt' is a int, not text"]),
    ("mixed.jsonl", b'"a"\n{"prompt": "b"}\n', ["line 2 is an object", "strings"]),
    ("blank.jsonl", b'{"prompt": "  "}\n', ["line 1 has an empty prompt"]),
    ("missing.json", b'[\n {"prompt": "a"},\n {"caption": "b"}\n]', ["line 3 has no 'prompt' field"]),
    ("truncated.json", b'[\n {"prompt": "a"},\n {"prompt": "b"', ["ends before the JSON list is closed"]),
    ("trailing.json", b'[\n "a",\n "b",\n]', ["line 4 has an empty element"]),
    ("after.json", b'["a"]\n["b"]\n', ["text after the end of the JSON list"]),
    ("object.json", b' [1, 2]', ["line 1 is a JSON int"]),
    ("nocolumn.csv", b"id,url\n1,x\n", ["line 1 has no prompt field", "'id', 'url'"]),
    ("short.csv", b"id,prompt\n1,a\n2\n", ["line 3 has 1 column(s)"]),
    ("open.csv", b'prompt\n"a\nb\n', ["line 2 opens a quoted CSV field"]),
])
def test_bad_files_are_refused_with_the_line(tmp_path, name, content, fragments):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PromptTextError) as caught:
        open_prompt_file(path)
    message = str(caught.value)
    assert "\n" not in message and name in message
    for fragment in fragments:
        assert fragment in message, message


def test_a_named_field_that_is_absent_or_on_strings_is_refused(tmp_path):
    table = write_csv(tmp_path / "p.csv", ["id", "prompt"], [[1, "a"]])
    with pytest.raises(PromptTextError, match="no column 'caption'.*'id', 'prompt'"):
        open_prompt_file(table, field="caption")
    strings = tmp_path / "s.jsonl"
    strings.write_text('"a"\n')
    with pytest.raises(PromptTextError, match="line 1 is a string, not an object with the field 'caption'"):
        open_prompt_file(strings, field="caption")
    with pytest.raises(PromptTextError, match="format 'yaml' is not known"):
        open_prompt_file(table, kind="yaml")


def test_a_file_changed_after_the_scan_is_refused(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a\nb\n")
    prompts = open_prompt_file(path)
    path.write_text("a\nbb\nc\n")
    with pytest.raises(PromptTextError, match="changed .* after it was read"):
        prompts[1]


def test_the_trainer_draws_from_a_prompt_set_without_listing_it(tmp_path, monkeypatch):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(500)))
    prompts = open_prompt_file(path)
    monkeypatch.setattr(PromptSet, "__iter__", lambda self: pytest.fail("the whole set was read"))
    trainer = Trainer(ToyBackend(), BrightnessReward(), prompts, toy_config(prompts_per_epoch=3))
    assert trainer.prompts is prompts
    batch = trainer.sample_epoch(0)
    assert len(set(batch.prompts)) == 3 and all(p.startswith("prompt ") for p in batch.prompts)
    listed = Trainer(ToyBackend(), BrightnessReward(), [f"prompt {i}" for i in range(500)],
                     toy_config(prompts_per_epoch=3)).sample_epoch(0)
    assert batch.prompts == listed.prompts        # the same draw as from the list


def test_cli_takes_jsonl_with_a_field_and_refuses_a_missing_one(tmp_path, capsys, monkeypatch):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": i, "desc": p}) + "\n" for i, p in enumerate(PROMPTS)))
    loaded = []

    def stop_at_model_load(*args, **kwargs):
        loaded.append(args)
        raise FileNotFoundError("stopped here by the test")
    monkeypatch.setattr(model_loading, "load_backend", stop_at_model_load)
    code = cli.main(["train", "--out", str(tmp_path / "run"), "--prompts", str(path), "--prompt-field", "desc"])
    err = capsys.readouterr().err
    assert code == 2 and "stopped here by the test" in err and loaded, err   # accepted up to the model
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["prompts"] == len(PROMPTS)
    assert record["prompts_sha256"] == hashlib.sha256("\n".join(PROMPTS).encode()).hexdigest()

    code = cli.main(["train", "--out", str(tmp_path / "run2"), "--prompts", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "line 1 has no prompt field" in err, err
    assert not (tmp_path / "run2").exists()


def test_the_train_node_lists_and_reads_every_prompt_format(tmp_path, monkeypatch):
    from comfy_inprocess import load_plugin_package

    package = load_plugin_package()
    train_paths = sys.modules[package.__name__ + ".nodes.train_paths"]

    class FolderPaths:
        @staticmethod
        def get_input_directory():
            return str(tmp_path)
    monkeypatch.setattr(train_paths, "folder_paths_module", lambda: FolderPaths)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "a.txt").write_text("a cat\n")
    (tmp_path / "prompts" / "b.jsonl").write_text('{"caption": "a dog"}\n')
    (tmp_path / "c.csv").write_text("prompt\na fox\n")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    assert train_paths.prompt_file_choices() == ["none", "a.txt", "c.csv", "prompts/b.jsonl"]
    node = package.NODE_CLASS_MAPPINGS["PRDPTrainLoRA"]
    assert node._prompts("a horse", "prompts/b.jsonl") == ["a horse", "a dog"]


def test_cli_keeps_a_checkpoint_when_the_prompt_file_changes_mid_run(tmp_path, capsys, monkeypatch):
    path = tmp_path / "p.txt"
    path.write_text("a cat\na dog\na fox\n")

    def load_then_edit(*args, **kwargs):
        path.write_text("something else entirely\n")      # the user edits the file once training began
        return ToyBackend(image_size=64)
    monkeypatch.setattr(model_loading, "load_backend", load_then_edit)
    out = tmp_path / "run"
    code = cli.main(["train", "--out", str(out), "--prompts", str(path), "--no-eval", "--steps", "2",
                     "--prompts-per-epoch", "2", "--images-per-prompt", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "changed (or vanished) after it was read" in err and "continue with --resume" in err, err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch_00000_stopped"]
