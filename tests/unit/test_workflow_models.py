"""The example workflows tell ComfyUI's frontend where each model they load comes from.

The frontend offers a download for a missing model when the loader node's
``properties.models`` holds ``{"name", "url", "directory"}`` for the file its widget names
(it keeps the entries whose name equals a widget value; it downloads only from
https://huggingface.co/ or civitai, names ending in .safetensors/.sft/.ckpt/.pth/.pt). And
the LoRA that "Compare a saved LoRA with the base" loads is one a shipped workflow writes.
"""
from __future__ import annotations

import json
import re
import urllib.parse

import pytest

from comfy_harness import workflow_files
from comfy_inprocess import load_plugin_package
from test_nodes_validate import train_widget_values

WORKFLOWS = workflow_files()
#: the model folder each core loader lists its choices from (ComfyUI's nodes.py)
LOADER_FOLDERS = {"CheckpointLoaderSimple": "checkpoints", "UNETLoader": "diffusion_models",
                  "DualCLIPLoader": "text_encoders", "CLIPLoader": "text_encoders", "VAELoader": "vae",
                  "LoraLoader": "loras"}
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pth", ".pt")


def _nodes(path):
    return json.loads(path.read_text())["nodes"]


def _model_values(node) -> list[str]:
    return [v for v in node.get("widgets_values") or [] if isinstance(v, str) and v.endswith(MODEL_SUFFIXES)]


def _written_loras() -> dict:
    """'prdp/<lora_name>.safetensors' -> the workflow that trains it."""
    nodes = load_plugin_package().NODE_CLASS_MAPPINGS
    written = {}
    for path in WORKFLOWS:
        for node in _nodes(path):
            if node["type"] == "PRDPTrainLoRA":
                values, _ = train_widget_values(nodes, node)
                written[f"prdp/{values['lora_name']}.safetensors"] = path
    return written


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_model_file_a_loader_names_has_its_download(path):
    written = _written_loras()
    for node in _nodes(path):
        if node["type"] not in LOADER_FOLDERS:
            continue
        entries = {m["name"]: m for m in node.get("properties", {}).get("models", [])}
        for name in _model_values(node):
            if node["type"] == "LoraLoader" and name in written:
                continue  # trained by a shipped workflow: nothing to download
            assert name in entries, f"{path.name}: {node['type']} names {name} without a download (properties.models)"
            entry = entries[name]
            url = urllib.parse.urlsplit(entry["url"])
            assert (url.scheme, url.netloc) == ("https", "huggingface.co"), entry
            repo, _, file = url.path.lstrip("/").partition("/resolve/main/")
            assert re.fullmatch(r"[\w.-]+/[\w.-]+", repo) and file.rsplit("/", 1)[-1] == name, entry
            assert entry["directory"] == LOADER_FOLDERS[node["type"]], entry
        stale = set(entries) - set(_model_values(node))
        assert not stale, f"{path.name}: {node['type']} lists models it does not load: {stale}"


def test_a_file_name_has_one_source_in_every_workflow():
    sources: dict = {}
    for path in WORKFLOWS:
        for node in _nodes(path):
            for entry in node.get("properties", {}).get("models", []):
                sources.setdefault(entry["name"], set()).add((entry["url"], entry["directory"]))
    assert sources, "no workflow names a model download"
    assert {name: found for name, found in sources.items() if len(found) > 1} == {}


def test_compare_saved_lora_loads_a_lora_that_a_workflow_trains():
    written = _written_loras()
    compare = next(p for p in WORKFLOWS if p.stem == "Compare a saved LoRA with the base")
    nodes = _nodes(compare)
    loras = [_model_values(n)[0] for n in nodes if n["type"] == "LoraLoader"]
    assert loras and all(lora in written for lora in loras), (loras, sorted(written))
    for lora in loras:  # trained on the same checkpoint, with the reward it is scored by
        trainer_nodes = _nodes(written[lora])
        for kind in ("CheckpointLoaderSimple", "PRDPLoadRewardModel"):
            same = [n["widgets_values"] for n in trainer_nodes if n["type"] == kind]
            here = [n["widgets_values"] for n in nodes if n["type"] == kind]
            assert same and same[:1] == here[:1], (kind, lora, same, here)
        note = next(n for n in nodes if n["type"] == "MarkdownNote")["widgets_values"][0]
        assert lora in note and written[lora].stem in note, note


def test_quick_test_note_states_its_cost_on_gpu_and_cpu():
    package = load_plugin_package()
    build_config = __import__(f"{package.__name__}.nodes.train_form", fromlist=["build_config"]).build_config
    path = next(p for p in WORKFLOWS if p.stem == "Start here - Quick test with the JPEG reward")
    workflow_nodes = _nodes(path)
    values, _ = train_widget_values(package.NODE_CLASS_MAPPINGS,
                                    next(n for n in workflow_nodes if n["type"] == "PRDPTrainLoRA"))
    config = build_config(values["preset"], **{k: v for k, v in values.items() if k != "preset"})
    evaluations = config.model_evaluations_per_epoch()
    note = next(n for n in workflow_nodes if n["type"] == "MarkdownNote")["widgets_values"][0]
    stated = re.search(r"(\d+) UNet evaluations per epoch \((\d+) of them with a backward pass\)", note)
    assert stated, note
    assert int(stated.group(1)) == sum(evaluations.values()), (evaluations, note)
    assert int(stated.group(2)) == evaluations["update_forward_backward"], (evaluations, note)
    assert f"{config.epochs} epochs" in note and f"{config.width} x {config.height}" in note
    assert "on a GPU" in note and "on a CPU" in note and "short epochs" not in note, note


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_every_training_workflow_takes_several_optimizer_steps_per_epoch(path):
    """The proximal clip binds only from an epoch's second optimizer step on (issue 21.3b)."""
    package = load_plugin_package()
    build_config = __import__(f"{package.__name__}.nodes.train_form", fromlist=["build_config"]).build_config
    trainers = [n for n in _nodes(path) if n["type"] == "PRDPTrainLoRA"]
    if not trainers:
        pytest.skip(f"{path.name} trains nothing")
    for node in trainers:
        values, _ = train_widget_values(package.NODE_CLASS_MAPPINGS, node)
        config = build_config(values["preset"], **{k: v for k, v in values.items() if k != "preset"})
        assert config.optimizer_steps_per_epoch() >= 2, (path.name, config.prompts_per_epoch,
                                                         config.minibatch_prompts)
