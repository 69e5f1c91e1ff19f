"""Workflows run in a real ComfyUI server on the CPU, on a tiny random-weight SD1.5 checkpoint.

The first part checks the UI-workflow -> API-prompt converter on hand-made graphs and needs
nothing but Python. The rest starts one ComfyUI server for the module (skipped with the
reason when no ComfyUI is found): a core-only workflow, every shipped example workflow
with tiny settings, cancel during training, and the saved LoRA through core LoraLoader.
"""
from __future__ import annotations

import io
import json
import re
import os
import time
from pathlib import Path

import pytest

import comfy_harness as harness
from comfy_harness import (MODE_BYPASS, MODE_NEVER, UiWorkflowBuilder, WorkflowConversionError,
                           override_inputs, workflow_to_api_prompt)

PRDP_NODES = ("PRDPLoadRewardModel", "PRDPTrainLoRA", "PRDPApplyLoRA", "PRDPScoreImages")
FINETUNED_MARKERS = {"PRDPTrainLoRA", "PRDPApplyLoRA", "LoraLoader", "LoraLoaderModelOnly", "LoraModelLoader"}
IMAGE_SIZE = harness.TINY_IMAGE_SIZE

# --------------------------------------------------------------------------------------
# Converter, on a synthetic /object_info (no ComfyUI needed)
# --------------------------------------------------------------------------------------

FAKE_OBJECT_INFO = {
    "Loader": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
               "output": ["MODEL", "LATENT"], "output_name": ["MODEL", "LATENT"], "display_name": "Load"},
    "Sampler": {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {"default": 0, "control_after_generate": True}],
                                       "steps": ["INT", {"default": 20}], "sampler_name": [["euler", "dpm"], {}],
                                       "latent": ["LATENT"]},
                          "optional": {"denoise": ["FLOAT", {"default": 1.0}]}},
                "output": ["LATENT"], "output_name": ["LATENT"], "display_name": "Sampler"},
    "LegacySeed": {"input": {"required": {"noise_seed": ["INT", {"default": 0}], "text": ["STRING", {"multiline": True}]}},
                   "output": ["INT"], "output_name": ["INT"]},
    "ComboControl": {"input": {"required": {"choice": [["x", "y"], {"control_after_generate": True}],
                                            "image": [["p.png", "q.png"], {"image_upload": True}],
                                            "after": ["INT", {"default": 1}]}},
                     "output": ["IMAGE"], "output_name": ["IMAGE"]},
    "ForceInput": {"input": {"required": {"value": ["INT", {"forceInput": True}], "text": ["STRING", {}]}},
                   "output": ["STRING"], "output_name": ["STRING"]},
    "LatentPass": {"input": {"required": {"model": ["MODEL"], "samples": ["LATENT"], "scale": ["FLOAT", {"default": 1.0}]}},
                   "output": ["LATENT"], "output_name": ["LATENT"]},
    "ListWidget": {"input": {"required": {"points": ["POINTS_WIDGET_FAKE", {}], "size": ["INT", {"default": 8}]}},
                   "output": ["LATENT"], "output_name": ["LATENT"]},
}


def _core_graph():
    g = UiWorkflowBuilder(FAKE_OBJECT_INFO)
    loader = g.node("Loader", {"ckpt_name": "b.safetensors"})
    sampler = g.node("Sampler", {"seed": 42, "steps": 3, "sampler_name": "dpm", "denoise": 0.5}, control="randomize")
    return g, loader, sampler


def test_widget_values_map_to_inputs_skipping_control_values():
    g, loader, sampler = _core_graph()
    g.link(loader, 0, sampler, "model")
    g.link(loader, 1, sampler, "latent")
    workflow = g.build()
    assert workflow["nodes"][1]["widgets_values"] == [42, "randomize", 3, "dpm", 0.5]
    prompt = workflow_to_api_prompt(workflow, FAKE_OBJECT_INFO)
    assert prompt[str(sampler)]["inputs"] == {"seed": 42, "steps": 3, "sampler_name": "dpm", "denoise": 0.5,
                                               "model": [str(loader), 0], "latent": [str(loader), 1]}
    assert prompt[str(loader)] == {"inputs": {"ckpt_name": "b.safetensors"}, "class_type": "Loader",
                                   "_meta": {"title": "Load"}}


def test_legacy_seed_name_combo_control_and_upload_widgets():
    workflow = {"nodes": [
        {"id": 1, "type": "LegacySeed", "mode": 0, "inputs": [], "outputs": [], "widgets_values": [7, "fixed", "hi"]},
        {"id": 2, "type": "ComboControl", "mode": 0, "inputs": [], "outputs": [],
         "widgets_values": ["y", "increment", "", "q.png", "image", 5]},
        {"id": 3, "type": "ForceInput", "mode": 0, "inputs": [{"name": "value", "type": "INT", "link": None}],
         "outputs": [], "widgets_values": ["text value"]},
    ], "links": []}
    prompt = workflow_to_api_prompt(workflow, FAKE_OBJECT_INFO)
    assert prompt["1"]["inputs"] == {"noise_seed": 7, "text": "hi"}
    assert prompt["2"]["inputs"] == {"choice": "y", "image": "q.png", "after": 5}
    assert prompt["3"]["inputs"] == {"text": "text value"}


def test_list_values_are_wrapped_and_dict_widgets_values_accepted():
    workflow = {"nodes": [
        {"id": 1, "type": "ListWidget", "mode": 0, "inputs": [], "outputs": [], "widgets_values": [8]},
        {"id": 2, "type": "Sampler", "mode": 0, "inputs": [], "outputs": [],
         "widgets_values": {"seed": 3, "steps": 4, "sampler_name": "euler", "bogus": 1}},
        {"id": 3, "type": "LegacySeed", "mode": 0, "inputs": [], "outputs": [], "widgets_values": [[1, 2], "fixed", "t"]},
    ], "links": []}
    prompt = workflow_to_api_prompt(workflow, FAKE_OBJECT_INFO)
    assert prompt["1"]["inputs"] == {"size": 8}  # a non-widget type gets no widget value
    assert prompt["2"]["inputs"] == {"seed": 3, "steps": 4, "sampler_name": "euler"}
    assert prompt["3"]["inputs"]["noise_seed"] == {"__value__": [1, 2]}


def test_converted_widget_input_link_overrides_the_widget_value():
    g, loader, sampler = _core_graph()
    seed_source = g.node("LegacySeed", {"noise_seed": 5, "text": "x"})
    g.link(seed_source, 0, sampler, "seed")
    prompt = workflow_to_api_prompt(g.build(), FAKE_OBJECT_INFO)
    assert prompt[str(sampler)]["inputs"]["seed"] == [str(seed_source), 0]


def test_reroutes_are_followed_and_notes_dropped():
    g, loader, sampler = _core_graph()
    first = g.node("Reroute")
    second = g.node("Reroute")
    note = g.node("Note", {"text": "read me"})
    g.link(loader, 0, first, 0)
    g.link(first, 0, second, 0)
    g.link(second, 0, sampler, "model")
    prompt = workflow_to_api_prompt(g.build(), FAKE_OBJECT_INFO)
    assert prompt[str(sampler)]["inputs"]["model"] == [str(loader), 0]
    assert {str(first), str(second), str(note)}.isdisjoint(prompt)


def test_primitive_node_value_is_written_into_the_widget_it_feeds():
    g, loader, sampler = _core_graph()
    primitive = g.node("PrimitiveNode", {"value": 1234})
    g.link(primitive, 0, sampler, "seed")
    prompt = workflow_to_api_prompt(g.build(), FAKE_OBJECT_INFO)
    assert prompt[str(sampler)]["inputs"]["seed"] == 1234
    assert str(primitive) not in prompt


def test_muted_node_is_dropped_with_the_inputs_linked_to_it():
    g, loader, sampler = _core_graph()
    muted = g.node("Loader", mode=MODE_NEVER)
    g.link(loader, 0, sampler, "model")
    g.link(muted, 1, sampler, "latent")
    prompt = workflow_to_api_prompt(g.build(), FAKE_OBJECT_INFO)
    assert str(muted) not in prompt
    assert "latent" not in prompt[str(sampler)]["inputs"]
    assert prompt[str(sampler)]["inputs"]["model"] == [str(loader), 0]


def test_bypassed_node_passes_its_matching_input_through():
    g, loader, sampler = _core_graph()
    bypassed = g.node("LatentPass", mode=MODE_BYPASS)
    g.link(loader, 0, bypassed, "model")
    g.link(loader, 1, bypassed, "samples")
    g.link(bypassed, 0, sampler, "latent")  # LATENT output <- the LATENT input, not slot 0 (MODEL)
    prompt = workflow_to_api_prompt(g.build(), FAKE_OBJECT_INFO)
    assert str(bypassed) not in prompt
    assert prompt[str(sampler)]["inputs"]["latent"] == [str(loader), 1]


def test_unknown_node_type_is_reported():
    workflow = {"nodes": [{"id": 1, "type": "NoSuchNode", "mode": 0, "inputs": [],
                           "outputs": [{"name": "X", "type": "X", "links": []}], "widgets_values": []}], "links": []}
    with pytest.raises(WorkflowConversionError, match="NoSuchNode"):
        workflow_to_api_prompt(workflow, FAKE_OBJECT_INFO)


def test_override_inputs_by_class_and_id_never_replaces_links():
    g, loader, sampler = _core_graph()
    g.link(loader, 0, sampler, "model")
    prompt = workflow_to_api_prompt(g.build(), FAKE_OBJECT_INFO)
    changed = override_inputs(prompt, {"Sampler": {"steps": 2, "model": "nope"}, str(loader): {"ckpt_name": "a.safetensors"}})
    assert changed[str(sampler)]["inputs"]["steps"] == 2
    assert changed[str(sampler)]["inputs"]["model"] == [str(loader), 0]
    assert changed[str(loader)]["inputs"]["ckpt_name"] == "a.safetensors"
    assert prompt[str(sampler)]["inputs"]["steps"] == 3  # the original is untouched
    with pytest.raises(KeyError, match="NotThere"):
        override_inputs(prompt, {"NotThere": {"x": 1}})
    assert override_inputs(prompt, {"NotThere": {"x": 1}}, strict=False) == prompt


# --------------------------------------------------------------------------------------
# A real server
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_name(server):
    return harness.TINY_SD15_FILENAME


def _decode_png(data: bytes):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def add_image_probes(prompt: dict, tag: str) -> dict[str, str]:
    """Add a SaveImage after every VAEDecode; returns {probe id: VAEDecode id}."""
    probes = {}
    for node_id in harness.nodes_of_type(prompt, "VAEDecode"):
        probe_id = f"probe_{node_id}"
        prompt[probe_id] = {"class_type": "SaveImage", "_meta": {"title": "harness probe"},
                            "inputs": {"images": [node_id, 0], "filename_prefix": f"harness/{tag}_{node_id}"}}
        probes[probe_id] = node_id
    return probes


def probe_images(server, result, probes: dict[str, str]) -> dict[str, list]:
    """{VAEDecode id: [image arrays]} from the probes' outputs."""
    images = {}
    for probe_id, decode_id in probes.items():
        entries = (result.outputs.get(probe_id) or {}).get("images") or []
        images[decode_id] = [_decode_png(server.output_path(item).read_bytes()) for item in entries]
    return images


def model_chain(prompt: dict, node_id: str) -> list[str]:
    """Class types met following ``model`` inputs up from a sampler."""
    chain, value = [], prompt[node_id]["inputs"].get("model")
    while isinstance(value, list) and len(value) == 2 and value[0] in prompt:
        node = prompt[value[0]]
        chain.append(node["class_type"])
        value = node["inputs"].get("model")
    return chain


def sampler_of(prompt: dict, decode_id: str) -> str | None:
    value = prompt[decode_id]["inputs"].get("samples")
    while isinstance(value, list) and value[0] in prompt:
        node = prompt[value[0]]
        if "model" in node["inputs"] and ("seed" in node["inputs"] or "noise_seed" in node["inputs"]):
            return value[0]
        value = next((v for k, v in node["inputs"].items() if k in ("samples", "latent_image", "latent")), None)
    return None


def _assert_success(server, result):
    assert result.status == "success", f"{result.describe()}\n--- server log ---\n{server.log_tail()}"


def test_core_workflow_runs_on_the_tiny_checkpoint(server, object_info, checkpoint_name):
    workflow = harness.core_ui_workflow(object_info, checkpoint_name)
    prompt = workflow_to_api_prompt(workflow, object_info)
    assert sorted(n["class_type"] for n in prompt.values()) == sorted(
        ["CheckpointLoaderSimple", "CLIPTextEncode", "CLIPTextEncode", "EmptyLatentImage", "KSampler",
         "VAEDecode", "SaveImage"])
    sampler = harness.nodes_of_type(prompt, "KSampler")[0]
    assert prompt[sampler]["inputs"]["seed"] == 11
    assert prompt[sampler]["inputs"]["latent_image"][0] == harness.nodes_of_type(prompt, "EmptyLatentImage")[0]
    started = time.monotonic()
    result = server.run(prompt, timeout=300)
    _assert_success(server, result)
    save = harness.nodes_of_type(prompt, "SaveImage")[0]
    images = result.outputs[save]["images"]
    assert len(images) == 1
    pixels = _decode_png(server.output_path(images[0]).read_bytes())
    assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert pixels.std() > 1.0, "the tiny checkpoint decoded a flat image"
    kinds = [kind for kind, _ in result.events]
    assert "execution_start" in kinds and "executed" in kinds and "progress" in kinds
    print(f"core workflow: {time.monotonic() - started:.1f} s")


# --------------------------------------------------------------------------------------
# Training inside the server (a graph built here, independent of workflows/)
# --------------------------------------------------------------------------------------

TINY_TRAINING = harness.TINY_TRAINING
COMPARE_PROMPT = "a photo of a cat"
COMPARE_SEED = 123
LORA_FOLDER_NAME = "prdp"  # LoRAs are written to models/loras/prdp/


def _require_nodes(object_info):
    missing = [name for name in PRDP_NODES if name not in object_info]
    if missing:
        pytest.skip(f"the server does not know {missing} (the nodes are not written yet?)")


def _sampler(g, model_source, clip_source, latent, seed=COMPARE_SEED, text=COMPARE_PROMPT):
    positive = g.node("CLIPTextEncode", {"text": text})
    negative = g.node("CLIPTextEncode", {"text": ""})
    sampler = g.node("KSampler", {"seed": seed, "steps": 2, "cfg": 4.0, "sampler_name": "euler",
                                  "scheduler": "normal", "denoise": 1.0})
    g.link(*clip_source, positive, "clip")
    g.link(*clip_source, negative, "clip")
    g.link(*model_source, sampler, "model")
    g.link(positive, 0, sampler, "positive")
    g.link(negative, 0, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    return sampler


def _decode(g, sampler, vae_source, name):
    decode = g.node("VAEDecode", title=name)
    g.link(sampler, 0, decode, "samples")
    g.link(*vae_source, decode, "vae")
    return decode


def training_ui_workflow(object_info, lora_name: str, **train_settings) -> tuple[dict, dict]:
    """Train, then sample base / trained MODEL / Apply LoRA(PRDP) with one seed.

    Returns the UI workflow and {"base"|"trained"|"applied": VAEDecode node id}."""
    g = UiWorkflowBuilder(object_info)
    ckpt = g.node("CheckpointLoaderSimple", {"ckpt_name": harness.TINY_SD15_FILENAME})
    reward = g.node("PRDPLoadRewardModel", {"reward": "jpeg-compressibility", "device": "cpu"})
    train = g.node("PRDPTrainLoRA", {**TINY_TRAINING, "lora_name": lora_name, **train_settings})
    for slot, name in enumerate(("model", "clip", "vae")):
        g.link(ckpt, slot, train, name)
    g.link(reward, 0, train, "reward_model")
    curve = g.node("SaveImage", {"filename_prefix": f"harness/{lora_name}_curve"})
    g.link(train, 2, curve, "images")
    latent = g.node("EmptyLatentImage", {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "batch_size": 1})
    apply = g.node("PRDPApplyLoRA", {"strength": 1.0})
    g.link(ckpt, 0, apply, "model")
    g.link(train, 1, apply, "lora")
    decodes = {}
    for name, model_source in (("base", (ckpt, 0)), ("trained", (train, 0)), ("applied", (apply, 0))):
        sampler = _sampler(g, model_source, (ckpt, 1), latent)
        decodes[name] = _decode(g, sampler, (ckpt, 2), name)
    return g.build(), {k: str(v) for k, v in decodes.items()}


def _lora_files(server) -> set[Path]:
    return set(server.loras_dir.rglob("*.safetensors"))


def _mean_abs_diff(a, b) -> float:
    return float(abs(a.astype("float64") - b.astype("float64")).mean())


@pytest.fixture(scope="module")
def trained(server, object_info):
    """One short training run in the server, shared by the tests below."""
    _require_nodes(object_info)
    workflow, decodes = training_ui_workflow(object_info, "harness_trained")
    prompt = workflow_to_api_prompt(workflow, object_info)
    probes = add_image_probes(prompt, "trained")
    before = _lora_files(server)
    started = time.monotonic()
    result = server.run(prompt, timeout=600)
    seconds = time.monotonic() - started
    _assert_success(server, result)
    new_loras = sorted(_lora_files(server) - before)
    images = probe_images(server, result, probes)
    return {"prompt": prompt, "result": result, "seconds": seconds, "loras": new_loras,
            "images": {name: images[decode_id] for name, decode_id in decodes.items()}}


def test_training_writes_a_kohya_lora_and_changes_the_image(trained):
    from safetensors import safe_open

    print(f"training prompt: {trained['seconds']:.1f} s")
    assert len(trained["loras"]) == 1, f"expected one new LoRA file, got {trained['loras']}"
    path = trained["loras"][0]
    assert path.parent.name == LORA_FOLDER_NAME and path.name.startswith("harness_trained")
    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata() or {}
    assert keys and all(k.startswith("lora_unet_") for k in keys), keys[:5]
    downs = {k[: -len(".lora_down.weight")] for k in keys if k.endswith(".lora_down.weight")}
    assert downs and all(f"{m}.lora_up.weight" in keys and f"{m}.alpha" in keys for m in downs)
    assert any("attn1_to_q" in m for m in downs), sorted(downs)[:5]
    assert metadata, "the LoRA file has no metadata"

    images = trained["images"]
    assert all(len(images[name]) == 1 for name in ("base", "trained", "applied")), {k: len(v) for k, v in images.items()}
    base, tuned, applied = images["base"][0], images["trained"][0], images["applied"][0]
    changed = _mean_abs_diff(base, tuned)
    assert changed > 0.5, f"the finetuned image equals the base one (mean |diff| {changed:.3f} of 255)"
    # the LORA_MODEL output applied to the untouched MODEL gives the trained MODEL's image
    assert _mean_abs_diff(applied, tuned) < 0.25 * changed, (_mean_abs_diff(applied, tuned), changed)


def test_training_reports_progress_and_epoch_metrics(trained):
    result, prompt = trained["result"], trained["prompt"]
    train_id = harness.nodes_of_type(prompt, "PRDPTrainLoRA")[0]
    progress = [d for d in result.events_of("progress") if d.get("node") == train_id]
    assert progress, "no progress events from the training node"
    assert progress[-1]["value"] == progress[-1]["max"]
    epochs = result.events_of("prdp.epoch")
    assert [e["epoch"] for e in epochs] == list(range(1, TINY_TRAINING["epochs"] + 1)), epochs
    assert all("reward_mean" in e["metrics"] for e in epochs)
    previews = [d for kind, d in result.events if kind == "binary"]
    assert previews, "no preview images were sent while training"
    curve = [n for n, entry in prompt.items() if entry["class_type"] == "SaveImage"
             and entry["inputs"]["images"][0] == train_id]
    assert result.outputs.get(curve[0], {}).get("images"), "no reward curve image"


def _sample_through_lora_loader(server, relative: str, ckpt_name: str = harness.TINY_SD15_FILENAME):
    """Checkpoint -> core LoraLoader(relative) -> sampler; returns (result, log lines, image)."""
    fresh_info = server.object_info()  # the LoRA list is read again on each request
    choices = fresh_info["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert relative in choices, f"LoraLoader does not list {relative}: {choices}"
    g = UiWorkflowBuilder(fresh_info)
    ckpt = g.node("CheckpointLoaderSimple", {"ckpt_name": ckpt_name})
    loader = g.node("LoraLoader", {"lora_name": relative, "strength_model": 1.0, "strength_clip": 1.0})
    g.link(ckpt, 0, loader, "model")
    g.link(ckpt, 1, loader, "clip")
    latent = g.node("EmptyLatentImage", {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "batch_size": 1})
    sampler = _sampler(g, (loader, 0), (loader, 1), latent)
    decode = _decode(g, sampler, (ckpt, 2), "from file")
    prompt = workflow_to_api_prompt(g.build(), fresh_info)
    probes = add_image_probes(prompt, "lora_loader")
    mark = server.log_mark()
    result = server.run(prompt, timeout=300)
    _assert_success(server, result)
    return result, server.log_since(mark), probe_images(server, result, probes)[str(decode)][0]


def _unmatched_key_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "lora key not loaded" in line or "NOT LOADED" in line]


def test_saved_lora_loads_in_core_lora_loader_without_unmatched_keys(server, trained):
    path = trained["loras"][0] if trained["loras"] else pytest.fail("training wrote no LoRA")
    result, log, from_file = _sample_through_lora_loader(server, path.relative_to(server.loras_dir).as_posix())
    assert not _unmatched_key_lines(log), log[-6000:]
    assert "ERROR" not in log, log[-6000:]
    base, tuned = trained["images"]["base"][0], trained["images"]["trained"][0]
    changed = _mean_abs_diff(base, tuned)
    assert _mean_abs_diff(from_file, tuned) < 0.25 * changed, (
        f"the LoRA file gives another image than the trained model: |file - trained| "
        f"{_mean_abs_diff(from_file, tuned):.3f}, |base - trained| {changed:.3f}")


def test_unmatched_lora_keys_are_detected(server, object_info):
    """Control for the test above: PEFT-style attention keys are dropped by ComfyUI and logged."""
    import torch
    from safetensors.torch import save_file

    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{module}.lora_A.weight": torch.zeros(2, 320), f"{module}.lora_B.weight": torch.zeros(320, 2)},
              str(server.loras_dir / "harness_peft_style.safetensors"))
    _, log, _ = _sample_through_lora_loader(server, "harness_peft_style.safetensors")
    assert _unmatched_key_lines(log), "ComfyUI logged no unmatched LoRA key for a PEFT-style file"


def test_cancel_during_training_stops_and_keeps_a_checkpoint(server, object_info):
    from safetensors.torch import load_file

    from comfyui_prdp.runs.checkpoints import OPTIMIZER_FILE

    _require_nodes(object_info)
    g = UiWorkflowBuilder(object_info)
    ckpt = g.node("CheckpointLoaderSimple", {"ckpt_name": harness.TINY_SD15_FILENAME})
    reward = g.node("PRDPLoadRewardModel", {"reward": "jpeg-compressibility", "device": "cpu"})
    train = g.node("PRDPTrainLoRA", {**TINY_TRAINING, "epochs": 500, "lora_name": "harness_cancelled"})
    for slot, name in enumerate(("model", "clip", "vae")):
        g.link(ckpt, slot, train, name)
    g.link(reward, 0, train, "reward_model")
    preview = g.node("PreviewImage")
    g.link(train, 2, preview, "images")
    prompt = workflow_to_api_prompt(g.build(), object_info)
    runs = server.output_dir / "prdp_runs"
    before = set(runs.rglob("*.safetensors")) if runs.exists() else set()
    loras_before = _lora_files(server)

    prompt_id = server.queue(prompt)
    listener = harness.listener_for(server.base_url)
    started = listener.wait_for_event(lambda e: e[0] == "prdp.epoch" and e[1].get("name", "").startswith("harness_cancelled"),
                                      timeout=300)
    assert started is not None, f"training never reported an epoch\n{server.log_tail()}"
    server.interrupt()
    pressed = time.monotonic()
    result = harness.wait_for(server.base_url, prompt_id, timeout=120)
    stop_seconds = time.monotonic() - pressed
    print(f"cancel -> interrupted in {stop_seconds:.1f} s")
    assert result.status == "interrupted", result.describe() + "\n" + server.log_tail()
    assert stop_seconds < 30, f"the prompt took {stop_seconds:.1f} s to stop after Cancel"
    epochs_done = len(result.events_of("prdp.epoch"))
    assert epochs_done < 500
    saved = sorted((set(runs.rglob("*.safetensors")) if runs.exists() else set()) - before)
    saved += sorted(_lora_files(server) - loras_before)
    saved = [path for path in saved if path.name != OPTIMIZER_FILE]  # the AdamW state holds no LoRA
    assert saved, f"no checkpoint LoRA written on Cancel; files under output: {sorted(server.output_dir.rglob('*'))}"
    for path in saved:
        tensors = load_file(str(path))
        assert tensors and any(k.endswith("lora_up.weight") or k.endswith("lora_B.weight") for k in tensors), path


# --------------------------------------------------------------------------------------
# The example workflows (example_workflows/, else workflows/), as users load them, with tiny settings
# --------------------------------------------------------------------------------------

WORKFLOW_FILES = harness.workflow_files()
#: the paper's multi-reward weighting minus HPSv2, whose tiny stand-in needs an open_clip
#: architecture registered inside the server process
TINY_COMPONENTS = "pickscore:10, aesthetic:0.05"


def tiny_workflow_overrides(prompt: dict, object_info: dict, lora_name: str,
                            trained_lora: str | None = None) -> dict:
    """Tiny CPU settings for a converted example workflow (only inputs the nodes have)."""
    wanted = {
        "CheckpointLoaderSimple": {"ckpt_name": harness.TINY_SD15_FILENAME},
        "EmptyLatentImage": {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "batch_size": 1},
        "EmptySD3LatentImage": {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "batch_size": 1},
        "KSampler": {"steps": 2},
        "KSamplerAdvanced": {"steps": 2},
        "PRDPTrainLoRA": {**TINY_TRAINING, "epochs": 1, "lora_name": lora_name},
        "LoraLoader": {"lora_name": trained_lora},
        "LoraLoaderModelOnly": {"lora_name": trained_lora},
    }
    overrides = {}
    for class_type, values in wanted.items():
        if not harness.nodes_of_type(prompt, class_type):
            continue
        known = set(object_info[class_type]["input"].get("required", {})) | set(object_info[class_type]["input"].get("optional", {}))
        values = {k: v for k, v in values.items() if k in known}
        if None in values.values():
            pytest.fail(f"{class_type} needs a trained LoRA and none was made")
        overrides[class_type] = values
    prompt = override_inputs(prompt, overrides)
    for node_id in harness.nodes_of_type(prompt, "PRDPLoadRewardModel"):
        inputs = prompt[node_id]["inputs"]
        inputs.update({"weights": "(auto)", "device": "cpu", "allow_download": False})
        if inputs.get("reward") == "weighted":
            inputs["components"] = TINY_COMPONENTS
        else:
            inputs["reward"] = "jpeg-compressibility"
    return prompt


@pytest.fixture(scope="module")
def tiny_reward_models(server):
    """The tiny real-format reward models (tests/support/reward_fixtures.py) in the server's folder."""
    reward_fixtures = pytest.importorskip("reward_fixtures")
    source = reward_fixtures.reward_model_dir()
    for entry in source.iterdir():
        link = server.reward_models_dir / entry.name
        if not link.exists():
            link.symlink_to(entry, target_is_directory=entry.is_dir())
    return server.reward_models_dir


def _base_and_finetuned_decodes(prompt: dict) -> tuple[list[str], list[str]]:
    base, tuned = [], []
    for decode_id in harness.nodes_of_type(prompt, "VAEDecode"):
        sampler = sampler_of(prompt, decode_id)
        assert sampler is not None, f"VAEDecode {decode_id} is not fed by a sampler"
        (tuned if FINETUNED_MARKERS & set(model_chain(prompt, sampler)) else base).append(decode_id)
    return base, tuned


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=[p.stem for p in WORKFLOW_FILES])
def test_example_workflow_runs_with_tiny_settings(server, object_info, path, request):
    if path.stem == "Train and compare SD3.5 with PickScore":
        pytest.skip("an SD3 workflow (16-channel latents), not one for the tiny SD1.5 checkpoint: it runs on a tiny "
                    "SD3 checkpoint in test_the_sd35_workflow_trains_a_flow_lora_on_a_checkpoint_comfyui_detects_as_sd3")
    if path.stem == "Teach by choosing - your picks as the reward":
        pytest.skip("asks a person to choose after each epoch: it runs to its end, answered in the dashboard by "
                    "clicks and keys, in test_comfy_human_choice.py::test_choosing_in_the_dashboard_trains_to_the_end")
    if path.stem == "Train and compare Flux with PickScore":
        pytest.skip("a Flux workflow (UNETLoader + DualCLIPLoader), not one for the tiny SD1.5 checkpoint; why no "
                    "tiny Flux runs it: tests/comfy/inprocess/test_comfy_flow.py::test_the_flux_workflow_has_no_real_server_run_"
                    "because_comfyui_builds_a_full_t5_xxl")
    _require_nodes(object_info)
    workflow = json.loads(path.read_text())
    prompt = workflow_to_api_prompt(workflow, object_info)
    base, tuned = _base_and_finetuned_decodes(prompt)
    assert base and tuned, f"{path.name}: expected a base and a finetuned image (base {base}, finetuned {tuned})"
    seeds = {prompt[sampler_of(prompt, d)]["inputs"].get("seed") for d in base + tuned}
    assert len(seeds) == 1, f"{path.name}: the base and finetuned samplers use different seeds {seeds}"

    trained_lora = None
    if harness.nodes_of_type(prompt, "LoraLoader") or harness.nodes_of_type(prompt, "LoraLoaderModelOnly"):
        trained = request.getfixturevalue("trained")
        trained_lora = trained["loras"][0].relative_to(server.loras_dir).as_posix()
    if any(prompt[n]["inputs"].get("reward") == "weighted" for n in harness.nodes_of_type(prompt, "PRDPLoadRewardModel")):
        request.getfixturevalue("tiny_reward_models")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)    # the workflow's title, as a LoRA name the node takes
    prompt = tiny_workflow_overrides(prompt, object_info, f"harness_{name}", trained_lora)
    probes = add_image_probes(prompt, name)
    trains = harness.nodes_of_type(prompt, "PRDPTrainLoRA")
    before = _lora_files(server)
    started = time.monotonic()
    result = server.run(prompt, timeout=600)
    print(f"{path.name}: {time.monotonic() - started:.1f} s")
    _assert_success(server, result)

    if trains:
        new = sorted(p.name for p in _lora_files(server) - before)
        assert len(new) == len(trains) and all(n.startswith(f"harness_{name}") for n in new), new
    images = probe_images(server, result, probes)
    for b in base:
        for t in tuned:
            assert images[b] and images[t], f"no image from VAEDecode {b} or {t}"
            diff = _mean_abs_diff(images[b][0], images[t][0])
            assert diff > 0.5, f"{path.name}: finetuned image (node {t}) equals the base one (node {b}): {diff:.3f}"
    for node_id in harness.nodes_of_type(prompt, "PRDPScoreImages"):
        shown = (result.outputs.get(node_id) or {}).get("text")
        assert shown, f"Score Images {node_id} showed no scores"
    saved = [n for n in harness.nodes_of_type(prompt, "SaveImage") if not n.startswith("probe_")]
    for node_id in saved:
        assert (result.outputs.get(node_id) or {}).get("images"), f"SaveImage {node_id} wrote nothing"


# --------------------------------------------------------------------------------------
# The SDXL and SD3.5 example workflows on checkpoints ComfyUI detects as SDXL / SD3
# --------------------------------------------------------------------------------------

SDXL_WORKFLOW = harness.REPO_ROOT / "example_workflows" / "Train and compare SDXL with PickScore.json"
SD35_WORKFLOW = harness.REPO_ROOT / "example_workflows" / "Train and compare SD3.5 with PickScore.json"


def _tiny_checkpoint_in_server(kind: str, server, tmp_path_factory) -> Path:
    """The tiny `kind` checkpoint (tests/support/comfy_tiny_checkpoints.py) in the server's
    checkpoints folder; its path."""
    from comfy_tiny_checkpoints import cached_tiny_checkpoint

    path = cached_tiny_checkpoint(kind, tmp_path_factory.getbasetemp() / "comfy_harness_cache", server.comfyui_root)
    link = server.checkpoints_dir / path.name
    if not link.exists():
        link.symlink_to(path)
    return path


def _discard_unless_kept(path: Path, server) -> None:
    """Delete a tiny checkpoint and its link once its tests are done (about 2 GB each, one per
    ComfyUI version), unless COMFY_HARNESS_CACHE_DIR asks to keep them across sessions."""
    if not os.environ.get("COMFY_HARNESS_CACHE_DIR"):
        (server.checkpoints_dir / path.name).unlink(missing_ok=True)
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def sdxl_checkpoint(server, tmp_path_factory):
    path = _tiny_checkpoint_in_server("sdxl", server, tmp_path_factory)
    yield path.name
    _discard_unless_kept(path, server)


@pytest.fixture(scope="module")
def sd3_checkpoint(server, tmp_path_factory):
    path = _tiny_checkpoint_in_server("sd3", server, tmp_path_factory)
    yield path.name
    _discard_unless_kept(path, server)


def _run_shipped_checkpoint_workflow(server, path: Path, checkpoint: str, label: str) -> dict:
    """`path` as shipped, with tiny settings, on `checkpoint`; the comparison sampled as
    _sample_through_lora_loader samples (for the file check). Returns the shipped inputs of the
    train and latent nodes, the new LoRA, the base and finetuned images and the server log."""
    object_info = server.object_info()        # read again: the checkpoint list now has the file
    _require_nodes(object_info)
    assert checkpoint in object_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    prompt = workflow_to_api_prompt(json.loads(path.read_text()), object_info)
    (ckpt,), (train,) = (harness.nodes_of_type(prompt, kind) for kind in ("CheckpointLoaderSimple", "PRDPTrainLoRA"))
    latents = harness.nodes_of_type(prompt, "EmptyLatentImage") + harness.nodes_of_type(prompt, "EmptySD3LatentImage")
    assert len(latents) == 1, latents
    shipped = {"checkpoint": prompt[ckpt]["inputs"]["ckpt_name"], "train": dict(prompt[train]["inputs"]),
               "latent": (prompt[latents[0]]["class_type"], prompt[latents[0]]["inputs"]["width"],
                          prompt[latents[0]]["inputs"]["height"])}
    base, tuned = _base_and_finetuned_decodes(prompt)
    assert len(base) == len(tuned) == 1

    prompt = tiny_workflow_overrides(prompt, object_info, label)
    negatives = [n for n in harness.nodes_of_type(prompt, "CLIPTextEncode") if prompt[n]["inputs"]["text"] != COMPARE_PROMPT]
    prompt = override_inputs(prompt, {"CheckpointLoaderSimple": {"ckpt_name": checkpoint},
                                      "KSampler": {"seed": COMPARE_SEED, "steps": 2, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "normal"},
                                      **{n: {"text": ""} for n in negatives}})
    probes = add_image_probes(prompt, label)
    before = _lora_files(server)
    mark = server.log_mark()
    started = time.monotonic()
    result = server.run(prompt, timeout=900)
    print(f"{path.name} on {checkpoint}: {time.monotonic() - started:.1f} s")
    _assert_success(server, result)
    log = server.log_since(mark)
    new = sorted(_lora_files(server) - before)
    assert len(new) == 1 and new[0].name.startswith(label), new
    for node_id in harness.nodes_of_type(prompt, "PRDPScoreImages"):
        assert (result.outputs.get(node_id) or {}).get("text"), f"Score Images {node_id} showed no scores"
    images = probe_images(server, result, probes)
    return {"shipped": shipped, "log": log, "lora": new[0],
            "base": images[base[0]][0], "finetuned": images[tuned[0]][0]}


def _assert_changed_and_the_file_gives_the_trained_image(server, run: dict, checkpoint: str) -> None:
    """The finetuned image differs from the base, and the LoRA file through core LoraLoader
    loads with no key left over and gives the trained model's image."""
    changed = _mean_abs_diff(run["base"], run["finetuned"])
    assert changed > 0.5, f"the finetuned image equals the base one (mean |diff| {changed:.3f} of 255)"
    _, loader_log, from_file = _sample_through_lora_loader(
        server, run["lora"].relative_to(server.loras_dir).as_posix(), ckpt_name=checkpoint)
    assert not _unmatched_key_lines(loader_log), loader_log[-6000:]
    assert _mean_abs_diff(from_file, run["finetuned"]) < 0.25 * changed, (
        _mean_abs_diff(from_file, run["finetuned"]), changed)


def test_the_sdxl_workflow_trains_an_sdxl_lora_and_compares_on_an_sdxl_checkpoint(server, sdxl_checkpoint):
    """The SDXL workflow ("Train and compare SDXL with PickScore.json") as shipped (SDXL checkpoint, the SDXL preset, native size,
    1024 px comparison), run with tiny settings on a checkpoint ComfyUI detects as SDXL: the
    node trains the SDXL model (pooled + size conditioning), the LoRA is an SDXL one by its
    metadata and keys, the finetuned image differs from the base and is scored, and the file
    loads through core LoraLoader with no key left over and gives the trained model's image."""
    from safetensors import safe_open

    run = _run_shipped_checkpoint_workflow(server, SDXL_WORKFLOW, sdxl_checkpoint, "harness_sdxl")
    shipped = run["shipped"]
    assert shipped["checkpoint"] == "sd_xl_base_1.0.safetensors"
    assert (shipped["train"]["preset"], shipped["train"]["width"], shipped["train"]["height"]) == ("consumer-gpu-sdxl", 0, 0)
    assert shipped["latent"] == ("EmptyLatentImage", 1024, 1024)
    assert f"PRDP: SDXL model, training at {IMAGE_SIZE}x{IMAGE_SIZE}" in run["log"], run["log"][-4000:]
    with safe_open(str(run["lora"]), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata() or {}
        cross_attention = [k for k in keys if k.endswith("attn2_to_k.lora_down.weight")]
        widths = {handle.get_slice(k).get_shape()[1] for k in cross_attention}
    assert (metadata.get("ss_base_model_version"), metadata.get("ss_resolution")) == \
        ("sdxl_base_v1-0", f"({IMAGE_SIZE}, {IMAGE_SIZE})"), metadata
    assert keys and all(k.startswith("lora_unet_") for k in keys), keys[:5]
    assert widths == {2048}, f"cross-attention LoRAs of SDXL read the 2048-wide text context, got {widths}"
    _assert_changed_and_the_file_gives_the_trained_image(server, run, sdxl_checkpoint)


def test_the_sd35_workflow_trains_a_flow_lora_on_a_checkpoint_comfyui_detects_as_sd3(server, sd3_checkpoint):
    """The SD3.5 workflow ("Train and compare SD3.5 with PickScore.json") as shipped (an SD3.5 checkpoint with its text encoders, the
    flow-SDE preset consumer-gpu-sd35, CFG, 16-channel latents), run with tiny settings on a
    checkpoint ComfyUI detects as SD3 (MMDiT, CLIP-L + CLIP-G, no T5): the node trains it as a
    flow model, the LoRA names the family and targets the MMDiT's joint blocks, the finetuned
    image differs from the base and is scored, and the file loads through core LoraLoader with
    no key left over and gives the trained model's image."""
    from safetensors import safe_open

    run = _run_shipped_checkpoint_workflow(server, SD35_WORKFLOW, sd3_checkpoint, "harness_sd35")
    shipped = run["shipped"]
    assert shipped["checkpoint"] == "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"
    assert (shipped["train"]["preset"], shipped["train"]["cfg"]) == ("consumer-gpu-sd35", 4.5)
    assert shipped["latent"] == ("EmptySD3LatentImage", 1024, 1024)
    assert f"PRDP: SD3 model, training at {IMAGE_SIZE}x{IMAGE_SIZE}" in run["log"], run["log"][-4000:]
    with safe_open(str(run["lora"]), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata() or {}
    assert metadata.get("base_family") == "SD3", metadata
    assert keys and all("joint_blocks" in k for k in keys), keys[:5]
    _assert_changed_and_the_file_gives_the_trained_image(server, run, sd3_checkpoint)
