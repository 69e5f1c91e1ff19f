"""Workflows run in a real ComfyUI server on the CPU, on a tiny random-weight SD1.5 checkpoint.

The first part checks the UI-workflow -> API-prompt converter on hand-made graphs and needs
nothing but Python. The rest starts one ComfyUI server for the module (skipped with the
reason when no ComfyUI is found): a core-only workflow, every workflow in ``workflows/``
with tiny settings, cancel during training, and the saved LoRA through core LoraLoader.
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

import comfy_harness as harness
from comfy_harness import (MODE_BYPASS, MODE_NEVER, UiWorkflowBuilder, WorkflowConversionError,
                           override_inputs, workflow_to_api_prompt)

WORKFLOWS_DIR = harness.REPO_ROOT / "workflows"
PRDP_NODES = ("PRDPLoadRewardModel", "PRDPTrainLoRA", "PRDPApplyLoRA", "PRDPScoreImages")
FINETUNED_MARKERS = {"PRDPTrainLoRA", "PRDPApplyLoRA", "LoraLoader", "LoraLoaderModelOnly", "LoraModelLoader"}
IMAGE_SIZE = 64

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
def server(tmp_path_factory):
    with harness.comfy_test_server(tmp_path_factory, "comfy_workflows") as comfy:
        yield comfy


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


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


def core_ui_workflow(object_info, ckpt_name: str) -> dict:
    """Checkpoint -> text encode x2 -> (bypassed upscale) -> KSampler -> VAEDecode -> SaveImage,
    with a Reroute, a PrimitiveNode seed, a Note and a muted node, as a user would save it."""
    g = UiWorkflowBuilder(object_info)
    ckpt = g.node("CheckpointLoaderSimple", {"ckpt_name": ckpt_name})
    positive = g.node("CLIPTextEncode", {"text": "a red apple on a table"})
    negative = g.node("CLIPTextEncode", {"text": "blurry"})
    latent = g.node("EmptyLatentImage", {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "batch_size": 1})
    upscale = g.node("LatentUpscaleBy", {"upscale_method": "nearest-exact", "scale_by": 2.0}, mode=MODE_BYPASS)
    sampler = g.node("KSampler", {"seed": 7, "steps": 2, "cfg": 4.0, "sampler_name": "euler",
                                  "scheduler": "normal", "denoise": 1.0}, control="randomize")
    decode = g.node("VAEDecode")
    save = g.node("SaveImage", {"filename_prefix": "harness/core"})
    reroute = g.node("Reroute")
    seed = g.node("PrimitiveNode", {"value": 11})
    g.node("Note", {"text": "tiny CPU test graph"})
    muted_save = g.node("SaveImage", {"filename_prefix": "harness/muted"}, mode=MODE_NEVER)
    g.link(ckpt, 0, reroute, 0)
    g.link(reroute, 0, sampler, "model")
    g.link(ckpt, 1, positive, "clip")
    g.link(ckpt, 1, negative, "clip")
    g.link(positive, 0, sampler, "positive")
    g.link(negative, 0, sampler, "negative")
    g.link(latent, 0, upscale, "samples")
    g.link(upscale, 0, sampler, "latent_image")
    g.link(seed, 0, sampler, "seed")
    g.link(sampler, 0, decode, "samples")
    g.link(ckpt, 2, decode, "vae")
    g.link(decode, 0, save, "images")
    g.link(decode, 0, muted_save, "images")
    return g.build()


def test_core_workflow_runs_on_the_tiny_checkpoint(server, object_info, checkpoint_name):
    workflow = core_ui_workflow(object_info, checkpoint_name)
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
