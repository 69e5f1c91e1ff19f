"""UI workflow -> API prompt (what the frontend's graphToPrompt does), building UI workflows in
tests, and the tiny CPU settings the ComfyUI tests share."""
from __future__ import annotations

import copy
import uuid
from typing import Any, Mapping


MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
VIRTUAL_NODE_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")


class WorkflowConversionError(ValueError):
    pass


def _input_specs(info: Mapping[str, Any]) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of the required then optional inputs, in declared order."""
    specs = []
    inputs = info.get("input", {})
    order = info.get("input_order", {})
    for section in ("required", "optional"):
        declared = inputs.get(section) or {}
        for name in order.get(section) or list(declared):
            spec = declared[name]
            kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
            options = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, kind, options))
    return specs


def _is_widget(kind: Any, options: Mapping[str, Any]) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _widget_layout(info: Mapping[str, Any]) -> list[tuple[str | None, bool]]:
    """The node's widgets in creation order: (input name, serialized) per widget.

    Mirrors the frontend: an INT with ``control_after_generate`` (or named seed/noise_seed)
    is followed by a non-serialized control widget; a combo with it by a control widget and
    a filter widget; an upload combo by an upload button.
    """
    layout: list[tuple[str | None, bool]] = []
    for name, kind, options in _input_specs(info):
        if not _is_widget(kind, options):
            continue
        layout.append((name, True))
        is_combo = isinstance(kind, list) or kind == "COMBO"
        if kind == "INT" and (options.get("control_after_generate") or
                              ("control_after_generate" not in options and name in ("seed", "noise_seed"))):
            layout.append((None, False))
        elif is_combo and options.get("control_after_generate"):
            layout.extend([(None, False), (None, False)])
        if is_combo and any(options.get(flag) for flag in UPLOAD_OPTIONS):
            layout.append((None, False))
    return layout


def _widget_values(node: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
    values = node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, dict):  # some nodes save widgets by name
        return {k: v for k, v in values.items() if k in {n for n, _, _ in _input_specs(info)}}
    result: dict[str, Any] = {}
    for (name, serialized), value in zip(_widget_layout(info), values):
        if serialized and name is not None:
            result[name] = {"__value__": value} if isinstance(value, list) else value
    return result


def _types_compatible(a: str, b: str) -> bool:
    if a in ("*", "") or b in ("*", "") or a == b:
        return True
    return bool(set(str(a).split(",")) & set(str(b).split(",")))


def workflow_to_api_prompt(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict:
    """Convert a UI-format workflow (version 0.4) to the API prompt the frontend queues.

    Widget values are matched to widget inputs in INPUT_TYPES order (control_after_generate
    and upload-button values skipped); links become ``[node_id, slot]``, overriding widget
    values of converted widget inputs; muted (mode 2) nodes are dropped with the inputs
    linked to them; bypassed (mode 4) nodes pass a matching input through; Reroutes are
    followed; a PrimitiveNode's value is written into the widgets it feeds; Notes vanish.
    """
    subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
    if subgraphs:
        subgraph_ids = {s.get("id") for s in subgraphs}
        used = [n["type"] for n in workflow.get("nodes", []) if n.get("type") in subgraph_ids]
        if used:
            raise WorkflowConversionError(f"subgraph nodes are not supported by this converter: {used}")
    nodes = {str(n["id"]): n for n in workflow.get("nodes", [])}
    links: dict[int, tuple[str, int, str, int, str]] = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link.get("type", "*")]
        link_id, from_node, from_slot, to_node, to_slot = link[:5]
        links[int(link_id)] = (str(from_node), int(from_slot), str(to_node), int(to_slot), link[5] if len(link) > 5 else "*")

    def is_virtual(node: Mapping[str, Any]) -> bool:
        return node.get("type") in VIRTUAL_NODE_TYPES or (node.get("type") not in object_info and not node.get("inputs") and not node.get("outputs"))

    for node in nodes.values():
        if node.get("type") in VIRTUAL_NODE_TYPES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        if node.get("type") not in object_info:
            raise WorkflowConversionError(f"node {node['id']} has type {node.get('type')!r}, which this server "
                                          "does not know (missing node type)")

    def input_link(node: Mapping[str, Any], slot: int) -> int | None:
        inputs = node.get("inputs") or []
        return inputs[slot].get("link") if slot < len(inputs) else None

    def resolve_input(node: Mapping[str, Any], slot: int, wanted_type: str | None, seen: set) -> tuple[str, int] | None:
        key = (str(node["id"]), "I", slot)
        if key in seen:
            raise WorkflowConversionError(f"circular link through node {node['id']}")
        seen.add(key)
        link_id = input_link(node, slot)
        if link_id is None:
            return None
        if link_id not in links:
            raise WorkflowConversionError(f"node {node['id']} input {slot} refers to missing link {link_id}")
        from_node, from_slot, _, _, _ = links[link_id]
        if from_node not in nodes:
            raise WorkflowConversionError(f"link {link_id} comes from missing node {from_node}")
        input_type = wanted_type or (node.get("inputs") or [])[slot].get("type", "*")
        return resolve_output(nodes[from_node], from_slot, input_type, seen)

    def resolve_output(node: Mapping[str, Any], slot: int, wanted_type: str, seen: set) -> tuple[str, int] | None:
        key = (str(node["id"]), "O", slot)
        if key in seen:
            raise WorkflowConversionError(f"circular link through node {node['id']}")
        seen.add(key)
        inputs = node.get("inputs") or []
        if node.get("mode", MODE_ALWAYS) == MODE_BYPASS:
            outputs = node.get("outputs") or []
            output_type = outputs[slot].get("type", "*") if slot < len(outputs) else "*"
            if wanted_type in ("*", ""):
                index = slot if len(inputs) > slot else 0
            elif slot < len(inputs) and _types_compatible(inputs[slot].get("type", "*"), output_type) \
                    and _types_compatible(inputs[slot].get("type", "*"), wanted_type):
                index = slot
            else:
                index = next((i for i, inp in enumerate(inputs) if inp.get("type") == wanted_type), -1)
                if index == -1:
                    index = next((i for i, inp in enumerate(inputs)
                                  if _types_compatible(inp.get("type", "*"), output_type)
                                  and _types_compatible(inp.get("type", "*"), wanted_type)), -1)
            if index == -1 or index >= len(inputs):
                return None
            return resolve_input(node, index, None, seen)
        if is_virtual(node):
            if slot < len(inputs):  # Reroute: output n mirrors input n
                return resolve_input(node, slot, wanted_type, seen)
            return None  # PrimitiveNode: its value is applied to the target widget
        return str(node["id"]), slot

    # PrimitiveNode.applyToGraph: copy the primitive's value into every widget it feeds
    primitive_values: dict[tuple[str, str], Any] = {}
    for node in nodes.values():
        if node.get("type") != "PrimitiveNode" or node.get("mode", MODE_ALWAYS) == MODE_NEVER:
            continue
        values = node.get("widgets_values") or []
        if not values:
            continue
        for output in node.get("outputs") or []:
            for link_id in output.get("links") or []:
                if link_id in links:
                    _, _, to_node, to_slot, _ = links[link_id]
                    target = nodes.get(to_node)
                    target_inputs = (target or {}).get("inputs") or []
                    if to_slot < len(target_inputs):
                        widget = target_inputs[to_slot].get("widget") or {}
                        name = widget.get("name", target_inputs[to_slot].get("name"))
                        primitive_values[(to_node, name)] = values[0]

    prompt: dict[str, dict] = {}
    for node_id, node in nodes.items():
        if is_virtual(node) or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info[node["type"]]
        inputs: dict[str, Any] = _widget_values(node, info)
        for (target, name), value in primitive_values.items():
            if target == node_id:
                inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for slot, slot_info in enumerate(node.get("inputs") or []):
            resolved = resolve_input(node, slot, None, set())
            if resolved is not None:
                inputs[slot_info["name"]] = [resolved[0], resolved[1]]
        prompt[node_id] = {"inputs": inputs, "class_type": node["type"],
                           "_meta": {"title": node.get("title") or info.get("display_name") or node["type"]}}
    for entry in prompt.values():  # inputs linked to dropped (muted) nodes
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def override_inputs(prompt: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]], *,
                    strict: bool = True) -> dict:
    """A copy of ``prompt`` with input values replaced.

    Keys of ``overrides`` are node ids or class types (every node of that type). With
    ``strict`` a key matching no node is an error (so a renamed node cannot silently make a
    test run with full-size settings); a linked input is never overwritten by a value.
    """
    result = copy.deepcopy(dict(prompt))
    for key, values in overrides.items():
        targets = [key] if key in result else [nid for nid, n in result.items() if n.get("class_type") == key]
        if not targets:
            if strict:
                raise KeyError(f"override target {key!r} matches no node id or class_type in the prompt "
                               f"(classes: {sorted({n.get('class_type') for n in result.values()})})")
            continue
        for node_id in targets:
            inputs = result[node_id].setdefault("inputs", {})
            for name, value in values.items():
                current = inputs.get(name)
                if isinstance(current, list) and len(current) == 2 and isinstance(current[0], str) and current[0] in result:
                    continue
                inputs[name] = value
    return result


def nodes_of_type(prompt: Mapping[str, Any], class_type: str) -> list[str]:
    return [nid for nid, n in prompt.items() if n.get("class_type") == class_type]


class UiWorkflowBuilder:
    """Build a UI-format (version 0.4) workflow by hand, shaped like the frontend saves it.

    Socket and widget inputs come from ``object_info`` (a widget input is listed with a
    ``widget`` entry, as the 1.2x frontend saves it); ``widgets`` are given by name and laid
    out in widget order, with a control value after seed-like widgets.
    """

    def __init__(self, object_info: Mapping[str, Any]):
        self.object_info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, class_type: str, widgets: Mapping[str, Any] | None = None, *, mode: int = MODE_ALWAYS,
             title: str | None = None, control: str = "fixed") -> int:
        node_id = len(self.nodes) + 1
        node: dict[str, Any] = {"id": node_id, "type": class_type, "pos": [node_id * 40, node_id * 30],
                                "size": [300, 120], "flags": {}, "order": node_id - 1, "mode": mode,
                                "properties": {"Node name for S&R": class_type}}
        if title:
            node["title"] = title
        if class_type in ("Note", "MarkdownNote"):
            node.update(inputs=[], outputs=[], widgets_values=[(widgets or {}).get("text", "")])
        elif class_type == "Reroute":
            node.update(inputs=[{"name": "", "type": "*", "link": None}],
                        outputs=[{"name": "", "type": "*", "links": []}], widgets_values=[])
        elif class_type == "PrimitiveNode":
            node.update(inputs=[], outputs=[{"name": "connect to widget input", "type": "*", "links": [],
                                             "widget": {"name": "value"}}],
                        widgets_values=[(widgets or {})["value"], control])
        else:
            info = self.object_info[class_type]
            inputs, values = [], []
            layout = _widget_layout(info)
            specs = {name: (kind, options) for name, kind, options in _input_specs(info)}
            for name, kind, options in _input_specs(info):
                entry = {"name": name, "type": "COMBO" if isinstance(kind, list) else kind, "link": None}
                if _is_widget(kind, options):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            for name, serialized in layout:
                if serialized:
                    kind, options = specs[name]
                    default = options.get("default", kind[0] if isinstance(kind, list) and kind else None)
                    values.append((widgets or {}).get(name, default))
                else:
                    values.append(control)
            outputs = [{"name": out_name, "type": out_type, "links": [], "slot_index": i}
                       for i, (out_type, out_name) in enumerate(zip(info.get("output", []), info.get("output_name", [])))]
            node.update(inputs=inputs, outputs=outputs, widgets_values=values)
        self.nodes.append(node)
        return node_id

    def link(self, from_node: int, from_slot: int, to_node: int, to_input: str | int) -> int:
        source, target = self.nodes[from_node - 1], self.nodes[to_node - 1]
        if isinstance(to_input, int):
            slot = to_input
        else:
            slot = next(i for i, inp in enumerate(target["inputs"]) if inp["name"] == to_input)
        link_id = len(self.links) + 1
        link_type = source["outputs"][from_slot]["type"]
        target["inputs"][slot]["link"] = link_id
        source["outputs"][from_slot]["links"].append(link_id)
        self.links.append([link_id, from_node, from_slot, to_node, slot, link_type])
        return link_id

    def build(self) -> dict:
        return {"id": str(uuid.uuid4()), "revision": 0, "last_node_id": len(self.nodes),
                "last_link_id": len(self.links), "nodes": copy.deepcopy(self.nodes),
                "links": copy.deepcopy(self.links), "groups": [], "config": {}, "extra": {}, "version": 0.4}


#: Tiny CPU settings shared by the tests: 64x64 images, and a PRDP run of seconds.
TINY_IMAGE_SIZE = 64
TINY_TRAINING = {"epochs": 2, "prompts_per_epoch": 1, "images_per_prompt": 2, "steps": 2,
                 "width": TINY_IMAGE_SIZE, "height": TINY_IMAGE_SIZE, "lora_rank": 2, "learning_rate": 3e-3,
                 "updates_per_epoch": 1, "seed": 5}


def core_ui_workflow(object_info, ckpt_name: str) -> dict:
    """Checkpoint -> text encode x2 -> (bypassed upscale) -> KSampler -> VAEDecode -> SaveImage,
    with a Reroute, a PrimitiveNode seed, a Note and a muted node, as a user would save it."""
    g = UiWorkflowBuilder(object_info)
    ckpt = g.node("CheckpointLoaderSimple", {"ckpt_name": ckpt_name})
    positive = g.node("CLIPTextEncode", {"text": "a red apple on a table"})
    negative = g.node("CLIPTextEncode", {"text": "blurry"})
    latent = g.node("EmptyLatentImage", {"width": TINY_IMAGE_SIZE, "height": TINY_IMAGE_SIZE, "batch_size": 1})
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
