"""The package inside a real ComfyUI server: it imports, its nodes and inputs are listed,
its example workflows are served, and bad training settings are refused before anything runs.

One server for the module (about 12 s to start on two cores); skipped with the reason when
no ComfyUI is found (see comfy_harness.find_comfyui_root).
"""
from __future__ import annotations

import json
import urllib.parse

import pytest

import comfy_harness as harness

PRDP_NODES = ("PRDPLoadRewardModel", "PRDPTrainLoRA", "PRDPApplyLoRA", "PRDPScoreImages")
REWARD_TYPE = "PRDP_REWARD"
TRAIN_WIDGETS = ("prompts", "negative_prompt", "preset", "epochs", "prompts_per_epoch", "images_per_prompt",
                 "steps", "cfg", "beta", "clip_range", "updates_per_epoch", "learning_rate", "lora_rank",
                 "width", "height", "seed", "lora_name")
WORKFLOW_FILES = harness.workflow_files()


def _require_package_entry_point():
    if not (harness.REPO_ROOT / "__init__.py").is_file():
        pytest.skip("the package has no __init__.py yet (nothing for ComfyUI to import)")


def _inputs(info: dict) -> dict:
    inputs = {}
    for section in ("required", "optional"):
        inputs.update(info["input"].get(section) or {})
    return inputs


def _type_of(spec) -> str:
    kind = spec[0]
    return "COMBO" if isinstance(kind, list) else kind


def test_package_imports_without_failure(server):
    _require_package_entry_point()
    log = server.log_text()
    failures = harness.package_import_failures(log)
    assert not failures, "\n".join(failures) + "\n--- log ---\n" + server.log_tail(12000)
    link = f"custom_nodes/{harness.PACKAGE_LINK_NAME}"
    timing_lines = [line for line in log.splitlines() if "seconds" in line and line.rstrip().endswith(link)]
    assert timing_lines, f"ComfyUI did not report importing {link}:\n{server.log_tail(12000)}"
    assert "comfyui-prdp: HTTP routes not registered" not in log


def test_object_info_shows_every_prdp_node_with_tooltips(server, object_info):
    _require_package_entry_point()
    missing = [name for name in PRDP_NODES if name not in object_info]
    assert not missing, f"not in /object_info: {missing}\n{server.log_tail(8000)}"
    for name in PRDP_NODES:
        info = object_info[name]
        assert info.get("display_name"), name
        assert info.get("description"), f"{name} has no DESCRIPTION"
        for input_name, spec in _inputs(info).items():
            options = spec[1] if len(spec) > 1 else {}
            assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_train_node_inputs_and_outputs(object_info):
    _require_package_entry_point()
    info = object_info["PRDPTrainLoRA"]
    inputs = _inputs(info)
    required = info["input"]["required"]
    for name, kind in (("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("reward_model", REWARD_TYPE)):
        assert name in required and _type_of(required[name]) == kind, (name, required.get(name))
    absent = [w for w in TRAIN_WIDGETS if w not in inputs]
    assert not absent, f"PRDPTrainLoRA lacks the widgets {absent}"
    assert inputs["prompts"][1].get("multiline") is True
    assert _type_of(inputs["preset"]) == "COMBO"
    assert info["output"] == ["MODEL", "LORA_MODEL", "IMAGE"]
    assert inputs["images_per_prompt"][1].get("min", 0) >= 2


def test_apply_score_and_load_nodes_connect_to_core_types(object_info):
    _require_package_entry_point()
    apply_inputs = _inputs(object_info["PRDPApplyLoRA"])
    assert sorted(_type_of(s) for s in apply_inputs.values()) == ["FLOAT", "LORA_MODEL", "MODEL"]
    assert object_info["PRDPApplyLoRA"]["output"] == ["MODEL"]
    score_types = [_type_of(s) for s in _inputs(object_info["PRDPScoreImages"]).values()]
    assert REWARD_TYPE in score_types and "IMAGE" in score_types and "STRING" in score_types
    assert object_info["PRDPLoadRewardModel"]["output"] == [REWARD_TYPE]
    # the LORA_MODEL output plugs into the core nodes that take one
    core_consumers = [name for name in ("LoraModelLoader", "SaveLoRA", "SaveLoRANode")
                      if name in object_info and "LORA_MODEL" in [_type_of(s) for s in _inputs(object_info[name]).values()]]
    assert core_consumers, "no core node takes LORA_MODEL in this ComfyUI"
    reward_choices = _inputs(object_info["PRDPLoadRewardModel"])
    combos = [spec[0] for spec in reward_choices.values() if isinstance(spec[0], list)]
    assert any("jpeg-compressibility" in values for values in combos), combos


def test_example_workflows_are_served_as_templates(server):
    _require_package_entry_point()
    if not WORKFLOW_FILES:
        pytest.skip("example_workflows/ has no .json yet")
    templates = harness.get_json(server.base_url, "/workflow_templates")
    listed = sorted(templates.get(harness.PACKAGE_LINK_NAME, []))
    assert listed == sorted(p.stem for p in WORKFLOW_FILES), templates
    for path in WORKFLOW_FILES:
        served = harness.get_json(server.base_url, f"/api/workflow_templates/{harness.PACKAGE_LINK_NAME}/"
                                                   f"{urllib.parse.quote(path.name)}")
        assert served == json.loads(path.read_text()), path.name
        assert "nodes" in served and "links" in served, f"{path.name} is not a UI-format workflow"


def _training_prompt(object_info, **train_overrides) -> dict:
    """Checkpoint -> reward -> PRDP Train LoRA -> preview of the reward curve (API format)."""
    builder = harness.UiWorkflowBuilder(object_info)
    ckpt = builder.node("CheckpointLoaderSimple", {"ckpt_name": harness.TINY_SD15_FILENAME})
    reward = builder.node("PRDPLoadRewardModel", {"reward": "jpeg-compressibility"})
    train = builder.node("PRDPTrainLoRA", {"epochs": 1, "prompts_per_epoch": 1, "images_per_prompt": 2,
                                           "steps": 2, "width": 64, "height": 64, "lora_rank": 2,
                                           "lora_name": "validation_probe", **train_overrides})
    preview = builder.node("PreviewImage")
    for slot, name in enumerate(("model", "clip", "vae")):
        builder.link(ckpt, slot, train, name)
    builder.link(reward, 0, train, "reward_model")
    builder.link(train, 2, preview, "images")
    return harness.workflow_to_api_prompt(builder.build(), object_info)


@pytest.mark.parametrize("overrides, fragment", [
    ({"prompts": "   \n# only a comment\n"}, "prompt"),
    ({"width": 100}, "width"),
    ({"height": 68}, "height"),
    ({"images_per_prompt": 1}, "images_per_prompt"),
    ({"lora_name": "../escape"}, "lora_name"),
], ids=["no-prompts", "width-not-multiple-of-8", "height-not-multiple-of-8", "one-image-per-prompt",
        "lora-name-with-folder"])
def test_bad_training_settings_are_refused_before_running(server, object_info, overrides, fragment):
    _require_package_entry_point()
    prompt = _training_prompt(object_info, **overrides)
    mark = server.log_mark()
    with pytest.raises(harness.PromptRejected) as rejected:
        server.queue(prompt)
    body = json.dumps(rejected.value.body)
    assert fragment in body, body
    train_id = harness.nodes_of_type(prompt, "PRDPTrainLoRA")[0]
    assert train_id in rejected.value.body.get("node_errors", {}), body
    assert "Requested to load" not in server.log_since(mark), "a model was loaded for a refused prompt"


def test_http_routes_answer_and_refuse_unknown_jobs(server):
    _require_package_entry_point()
    import urllib.error

    jobs = harness.get_json(server.base_url, "/prdp/jobs")
    assert isinstance(jobs, (list, dict)), jobs
    for method, path in (("GET", "/prdp/jobs/0123456789ab"), ("GET", "/prdp/jobs/..%2F..%2Fetc"),
                         ("POST", "/prdp/jobs/0123456789ab/stop")):
        with pytest.raises(urllib.error.HTTPError) as error:
            harness.http_json(method, server.base_url + path, {} if method == "POST" else None)
        assert error.value.code in (400, 404), (path, error.value.code)


@pytest.mark.parametrize("backend", ["websocket-client", "aiohttp"])
def test_event_listener_backends_receive_the_status_event(server, backend):
    if backend == "websocket-client":
        pytest.importorskip("websocket", reason="websocket-client is not installed")
    listener = harness.EventListener(server.base_url, backend=backend)
    try:
        found = listener.wait_for_event(lambda e: e[0] == "status", timeout=20)
        assert found is not None, listener.events
        assert found[1][1].get("sid") == listener.client_id
    finally:
        listener.close()
    assert not listener.alive


def test_web_extension_files_are_served(server):
    _require_package_entry_point()
    import urllib.request

    web_files = sorted((harness.REPO_ROOT / "web").glob("*.js"))
    if not web_files:
        pytest.skip("the package has no web/*.js extension")
    listed = harness.get_json(server.base_url, "/extensions")
    for path in web_files:
        url = f"/extensions/{harness.PACKAGE_LINK_NAME}/{path.name}"
        assert url in listed, (url, listed)
        with urllib.request.urlopen(server.base_url + url, timeout=30) as response:
            assert response.read() == path.read_bytes()
