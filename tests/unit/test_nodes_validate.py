"""The node forms, without running ComfyUI: the package loads the way ComfyUI loads it, every
input is documented, bad settings are refused by VALIDATE_INPUTS with a message naming the
problem, and the example workflows match the nodes' widget order."""
import json

import pytest
import torch

from comfy_inprocess import REPO_ROOT, load_plugin_package

WORKFLOWS = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
NAMES = {
    "PRDPLoadRewardModel": "Load Reward Model (PRDP)",
    "PRDPTrainLoRA": "PRDP Train LoRA",
    "PRDPApplyLoRA": "Apply LoRA (PRDP)",
    "PRDPScoreImages": "Score Images (PRDP)",
    "PRDPHumanChoiceReward": "PRDP Human Choice Reward",
}
#: widget counts of the core nodes the workflows use (ComfyUI 0.3.6x; seed adds its control)
CORE_WIDGETS = {"CheckpointLoaderSimple": 1, "CLIPTextEncode": 1, "EmptyLatentImage": 3, "KSampler": 7,
                "VAEDecode": 0, "ImageStitch": 4, "SaveImage": 1, "LoraLoader": 3, "MarkdownNote": 1,
                "UNETLoader": 2, "DualCLIPLoader": 4, "VAELoader": 1, "FluxGuidance": 1, "EmptySD3LatentImage": 3}
#: the model files each shipped workflow loads: {loader type: [widgets_values of each such node]}
WORKFLOW_MODELS = {
    "Train and compare SDXL with PickScore": {"CheckpointLoaderSimple": [["sd_xl_base_1.0.safetensors"]]},
    "Train and compare SD3.5 with PickScore": {"CheckpointLoaderSimple": [["sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"]]},
    "Train and compare Flux with PickScore": {"UNETLoader": [["flux1-dev.safetensors", "default"]],
                               "DualCLIPLoader": [["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"]],
                               "VAELoader": [["ae.safetensors"]]},
}
SD15_MODELS = {"CheckpointLoaderSimple": [["v1-5-pruned-emaonly.safetensors"]]}
GOOD = dict(prompts="a cat\na dog", negative_prompt="", preset="cpu-smoke", epochs=2, prompts_per_epoch=2,
            images_per_prompt=2, steps=2, cfg=3.0, beta=0.1, clip_range=0.01, updates_per_epoch=1,
            learning_rate=3e-3, lora_rank=2, width=64, height=64, seed=0, lora_name="tiny")


def refusal(node, **values) -> str:
    """The one message VALIDATE_INPUTS refuses `values` with (it raises: see nodes.common.FormRefused)."""
    with pytest.raises(ValueError) as refused:
        node.VALIDATE_INPUTS(**values)
    assert type(refused.value).__name__ == "FormRefused"
    return str(refused.value)


@pytest.fixture(scope="module")
def package():
    return load_plugin_package()


@pytest.fixture(scope="module")
def nodes(package):
    return package.NODE_CLASS_MAPPINGS


def test_entry_point_names_every_node_and_the_web_folder(package):
    assert package.NODE_DISPLAY_NAME_MAPPINGS == NAMES
    assert set(package.NODE_CLASS_MAPPINGS) == set(NAMES)
    assert package.WEB_DIRECTORY == "./web"


def test_importing_the_package_outside_comfyui_imports_no_comfyui_module():
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, 'tests/support'); from comfy_inprocess import load_plugin_package; "
            "p = load_plugin_package(); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'server', 'nodes', "
            "'comfy_extras', 'execution')); print(len(p.NODE_CLASS_MAPPINGS), bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5 []", out.stdout


def test_every_input_has_a_tooltip_and_nodes_are_in_the_prdp_category(nodes):
    for name, cls in nodes.items():
        assert cls.CATEGORY == "PRDP"
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for input_name, (kind, *options) in spec.get(section, {}).items():
                assert options and options[0].get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert callable(getattr(cls(), cls.FUNCTION))


def test_types_connect_to_core_nodes(nodes):
    train = nodes["PRDPTrainLoRA"]
    assert train.RETURN_TYPES == ("MODEL", "LORA_MODEL", "IMAGE")
    required = train.INPUT_TYPES()["required"]
    assert [required[k][0] for k in ("model", "clip", "vae", "reward_model")] == ["MODEL", "CLIP", "VAE", "PRDP_REWARD"]
    assert nodes["PRDPLoadRewardModel"].RETURN_TYPES == ("PRDP_REWARD",)
    assert nodes["PRDPApplyLoRA"].INPUT_TYPES()["required"]["lora"][0] == "LORA_MODEL"
    assert nodes["PRDPScoreImages"].RETURN_TYPES[:2] == ("FLOAT", "STRING")
    assert nodes["PRDPScoreImages"].OUTPUT_NODE is True


def test_train_widgets_are_named_as_documented(nodes):
    spec = nodes["PRDPTrainLoRA"].INPUT_TYPES()
    widgets = list(spec["required"]) + list(spec["optional"])
    for name in ("prompts", "negative_prompt", "preset", "epochs", "prompts_per_epoch", "images_per_prompt",
                 "steps", "cfg", "beta", "clip_range", "updates_per_epoch", "learning_rate", "lora_rank",
                 "width", "height", "seed", "lora_name", "prompt_file", "checkpoint_every", "resume_from"):
        assert name in widgets, name
    assert spec["required"]["prompts"][1]["multiline"] is True
    for small in ("beta", "clip_range", "learning_rate"):        # tiny values must not be rounded away
        assert spec["required"][small][1]["round"] is False


def test_good_settings_pass_validation(nodes):
    assert nodes["PRDPTrainLoRA"].VALIDATE_INPUTS(**GOOD) is True
    # prompts coming through a link are not known yet: checked at run time instead
    assert nodes["PRDPTrainLoRA"].VALIDATE_INPUTS(**{**GOOD, "prompts": None}) is True


@pytest.mark.parametrize("change, fragment", [
    ({"prompts": "  \n# only a comment\n"}, "no prompts"),
    ({"width": 100}, "width=100"),
    ({"height": 60}, "height=60"),
    ({"images_per_prompt": 1}, "images_per_prompt=1"),
    ({"preset": "fast"}, "preset='fast'"),
    ({"lora_name": "../escape"}, "lora_name"),
    ({"lora_name": "sub/dir"}, "lora_name"),
    ({"steps": 5000}, "steps=5000"),
    ({"cfg": 0.5}, "cfg=0.5"),
    ({"beta": -1.0}, "beta=-1.0"),
    ({"epochs": 0}, "epochs=0"),
    ({"prompt_file": "../../etc/passwd"}, "prompt_file"),
    ({"resume_from": "/tmp/somewhere"}, "resume_from"),
])
def test_bad_settings_are_refused_with_a_message_naming_them(nodes, change, fragment):
    message = refusal(nodes["PRDPTrainLoRA"], **{**GOOD, **change})
    assert fragment in message, message


def test_several_problems_are_reported_together(nodes):
    message = refusal(nodes["PRDPTrainLoRA"], **{**GOOD, "width": 65, "images_per_prompt": 1})
    assert "width=65" in message and "images_per_prompt=1" in message


def test_form_values_override_the_preset_and_the_preset_fills_the_rest(package):
    form = __import__(f"{package.__name__}.nodes.train_form", fromlist=["build_config"])
    config = form.build_config("consumer-gpu", epochs=3, learning_rate=1e-3, width=256, height=128, seed=5)
    assert (config.epochs, config.learning_rate, config.width, config.height, config.seed) == (3, 1e-3, 256, 128, 5)
    assert config.mixed_precision == "fp16" and config.gradient_checkpointing is True   # from the preset
    assert form.parse_prompts("a cat\n\n  # note\n a dog  \n") == ["a cat", "a dog"]


def test_a_zero_size_is_accepted_as_the_models_native_size_and_512_stays_a_choice(nodes, package):
    """0 (the default) is resolved by the node once the model is known; until then the preset's
    size stands in (its memory bound is checked again at run time with the real size)."""
    form = __import__(f"{package.__name__}.nodes.train_form", fromlist=["build_config"])
    assert nodes["PRDPTrainLoRA"].VALIDATE_INPUTS(**{**GOOD, "width": 0, "height": 0}) is True
    assert (form.build_config("consumer-gpu-sdxl", width=0, height=0).width) == 1024
    config = form.build_config("consumer-gpu-sdxl", width=512, height=512)
    assert (config.width, config.height) == (512, 512)


def test_load_reward_validation(nodes):
    load = nodes["PRDPLoadRewardModel"]
    assert load.VALIDATE_INPUTS("jpeg-compressibility", "(auto)") is True
    assert "unknown reward" in refusal(load, reward="no-such-reward", weights="(auto)")
    assert "uses no model" in refusal(load, reward="jpeg-compressibility", weights="some.safetensors")
    assert "not in models/reward_models" in refusal(load, reward="pickscore", weights="missing.safetensors")
    assert "components" in refusal(load, reward="weighted", weights="(auto)", components="pickscore:ten")
    assert "unknown reward" in refusal(load, reward="weighted", weights="(auto)", components="pickscore:1, nope:2")
    assert load.VALIDATE_INPUTS("weighted", "(auto)", components="pickscore:10, hpsv2:2, aesthetic:0.05") is True


def test_load_reward_builds_a_jpeg_reward_and_scores_through_the_score_node(nodes):
    reward, = nodes["PRDPLoadRewardModel"]().load("jpeg-incompressibility", "(auto)", "cpu", "auto")
    flat = torch.full((1, 32, 32, 3), 0.5)
    noisy = torch.rand((1, 32, 32, 3), generator=torch.Generator().manual_seed(0))
    out = nodes["PRDPScoreImages"]().score(reward, torch.cat([flat, noisy]), "a cat", "base")
    mean, text, annotated = out["result"]
    scores = [float(s) for s in text.split("[")[1].rstrip("]").split(", ")]
    assert scores[1] > scores[0]                    # noise compresses worse
    assert mean == pytest.approx(sum(scores) / 2, abs=1e-4)
    assert text.startswith("base: mean") and out["ui"]["text"] == [text]
    assert annotated.shape == (2, 32, 32, 3)
    assert not torch.equal(annotated[0], flat[0])   # the score is written on it
    with pytest.raises(ValueError, match="one line per image"):
        nodes["PRDPScoreImages"]().score(reward, torch.cat([flat, flat, flat]), "a\nb", "")


def train_widget_values(nodes, node: dict) -> tuple:
    """({widget name: value}, the seed's control value) of a PRDP Train LoRA node of a UI
    workflow, whose widgets_values follow INPUT_TYPES order as the frontend writes them."""
    spec = nodes["PRDPTrainLoRA"].INPUT_TYPES()
    names = [name for section in ("required", "optional") for name, (kind, *_) in spec[section].items()
             if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN")]
    values = list(node["widgets_values"])
    control = values.pop(names.index("seed") + 1)
    assert len(values) == len(names), (names, values)
    return dict(zip(names, values)), control


def widget_count(spec: dict) -> int:
    """Widgets the frontend creates for a V1 node spec (a seed INT adds its control widget)."""
    count = 0
    for section in ("required", "optional"):
        for name, (kind, *options) in spec.get(section, {}).items():
            options = options[0] if options else {}
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                if options.get("forceInput"):
                    continue
                count += 1
                if kind == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
                    count += 1
    return count


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflows_are_consistent_ui_graphs(nodes, path):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    by_id = {n["id"]: n for n in workflow["nodes"]}
    assert workflow["last_node_id"] == max(by_id) and workflow["last_link_id"] == max(l[0] for l in workflow["links"])
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        assert link_id in (by_id[src]["outputs"][src_slot]["links"] or [])
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id
        assert by_id[src]["outputs"][src_slot]["type"] == by_id[dst]["inputs"][dst_slot]["type"] == kind
    for node in workflow["nodes"]:
        if node["type"] in nodes:
            spec = nodes[node["type"]].INPUT_TYPES()
            assert len(node["widgets_values"]) == widget_count(spec), node["type"]
            sockets = [n for s in ("required", "optional") for n, (k, *o) in spec.get(s, {}).items()
                       if not (isinstance(k, list) or k in ("INT", "FLOAT", "STRING", "BOOLEAN"))
                       or (o and o[0].get("forceInput"))]
            assert [i["name"] for i in node["inputs"]] == [s for s in sockets if s in {i["name"] for i in node["inputs"]}]
            assert all(i["link"] is not None for i in node["inputs"] if i["name"] in spec["required"]), node["type"]
        else:
            assert len(node["widgets_values"]) == CORE_WIDGETS[node["type"]], node["type"]
    train = [n for n in workflow["nodes"] if n["type"] == "PRDPTrainLoRA"]
    for node in train:   # real-use defaults, and a seed that does not change on every queue
        values, seed_control = train_widget_values(nodes, node)
        # 0: the checkpoint's native size; 512 is SD1.5's (and the Flux preset's), set by hand
        assert values["width"] == values["height"] and values["width"] in (0, 512)
        assert seed_control == "fixed"
        assert nodes["PRDPTrainLoRA"].VALIDATE_INPUTS(**values) is True     # every widget, flow_guidance too
    expected = WORKFLOW_MODELS.get(path.stem, SD15_MODELS)
    loaders = {kind: [n["widgets_values"] for n in workflow["nodes"] if n["type"] == kind]
               for kind in ("CheckpointLoaderSimple", "UNETLoader", "DualCLIPLoader", "VAELoader")}
    assert {kind: found for kind, found in loaders.items() if found} == expected


def test_the_three_workflows_exist():
    assert {p.name for p in WORKFLOWS} >= {"Train and compare SD1.5 with PickScore.json", "Compare a saved LoRA with the base.json", "Multi-reward PickScore HPSv2 aesthetic.json"}


def test_the_flux_workflow_trains_and_compares_as_flux_dev_is_sampled(nodes):
    """The Flux workflow ("Train and compare Flux with PickScore.json"): the consumer-gpu-flux preset at cfg 1 with the distilled
    guidance the comparison's FluxGuidance gives, and both samplers see that guidance."""
    workflow = json.loads((REPO_ROOT / "example_workflows" / "Train and compare Flux with PickScore.json").read_text())
    by_id = {n["id"]: n for n in workflow["nodes"]}
    (train,) = [n for n in workflow["nodes"] if n["type"] == "PRDPTrainLoRA"]
    (guidance,) = [n for n in workflow["nodes"] if n["type"] == "FluxGuidance"]
    values, _ = train_widget_values(nodes, train)
    assert (values["preset"], values["cfg"], values["flow_guidance"]) == ("consumer-gpu-flux", 1.0, 3.5)
    assert guidance["widgets_values"] == [values["flow_guidance"]]
    links = {link[0]: link for link in workflow["links"]}
    samplers = [n for n in workflow["nodes"] if n["type"] == "KSampler"]
    assert len(samplers) == 2
    for sampler in samplers:
        positive = next(i["link"] for i in sampler["inputs"] if i["name"] == "positive")
        assert by_id[links[positive][1]]["type"] == "FluxGuidance"
        assert sampler["widgets_values"][3] == 1.0          # cfg 1: guidance-distilled
    (latent,) = [n for n in workflow["nodes"] if n["type"] == "EmptySD3LatentImage"]   # Flux's 16 channels
    assert latent["widgets_values"][:2] == [values["width"], values["height"]]


def test_flow_guidance_is_the_presets_by_default_and_overrides_it_when_set(nodes, package):
    form = __import__(f"{package.__name__}.nodes.train_form", fromlist=["build_config"])
    spec = nodes["PRDPTrainLoRA"].INPUT_TYPES()["optional"]["flow_guidance"]
    assert spec[0] == "FLOAT" and spec[1]["default"] == form.PRESET_GUIDANCE == -1.0
    assert form.build_config("consumer-gpu-flux", flow_guidance=-1.0).flow_guidance == 3.5
    assert form.build_config("consumer-gpu-flux", flow_guidance=2.0).flow_guidance == 2.0
    assert form.build_config("consumer-gpu-flux", flow_guidance=0.0).flow_guidance == 0.0   # a value, not "unset"
    assert form.build_config("consumer-gpu", flow_guidance=-1.0).flow_guidance is None      # the model's default
    assert nodes["PRDPTrainLoRA"].VALIDATE_INPUTS(**{**GOOD, "flow_guidance": 3.5}) is True
    assert nodes["PRDPTrainLoRA"].VALIDATE_INPUTS(**{**GOOD, "flow_guidance": -1.0}) is True


# --- the node's own limits (issue 8, item 3) ------------------------------------------------------
@pytest.mark.parametrize("change, fragment", [
    ({"width": 8}, "width=8: at least 64 (or 0 for the model's native size)"),
    ({"height": 56}, "height=56: at least 64 (or 0 for the model's native size)"),
    ({"epochs": 100001}, "epochs=100001: at most 100000"),
    ({"seed": -1}, "seed=-1: at least 0"),
    ({"lora_rank": 100000}, "lora_rank=100000: at most"),
    ({"images_per_prompt": 100000}, "images_per_prompt=100000: at most"),
    ({"prompts_per_epoch": 10 ** 7}, "prompts_per_epoch=10000000: at most"),
    ({"steps": 0}, "steps=0: at least 1"),
    ({"width": 4096}, "width=4096: at most"),
    ({"prompts_per_epoch": 4096, "images_per_prompt": 256}, "GiB"),      # each allowed, together too big
    ({"epochs": "abc"}, "epochs='abc': must be a whole number"),
    ({"lora_rank": 2.5}, "lora_rank=2.5: must be a whole number"),
    ({"learning_rate": float("inf")}, "learning_rate=inf: must be a finite number"),
    ({"cfg": float("nan")}, "cfg=nan: must be a finite number"),
    ({"beta": float("-inf")}, "beta=-inf"),
    ({"clip_range": "0.1"}, "clip_range='0.1': must be a number"),
    ({"lora_name": "x\n"}, "lora_name='x\\n'"),
    ({"algorithm": "ppo"}, "algorithm='ppo' is not one of the choices"),
    ({"flow_guidance": -0.5}, "flow_guidance=-0.5: at least 0 (or -1 for the preset's value)"),
    ({"flow_guidance": 100.5}, "flow_guidance=100.5: at most 100.0"),
    ({"flow_guidance": float("nan")}, "flow_guidance=nan: must be a finite number"),
    ({"prompts": "a cat\n" + "x" * 20000}, "line 2 is 20000 characters"),
    ({"prompts": "a cat\x00\x01"}, "NUL bytes"),
])
def test_declared_limits_kinds_and_memory_bounds_are_enforced(nodes, change, fragment):
    message = refusal(nodes["PRDPTrainLoRA"], **{**GOOD, **change})
    assert fragment in message, message


def test_limits_are_the_declared_ones_at_both_ends(nodes):
    """Every INT/FLOAT widget: its declared min and max pass, one step beyond is refused."""
    train = nodes["PRDPTrainLoRA"]
    spec = train.INPUT_TYPES()
    checked = 0
    for section in ("required", "optional"):
        for name, (kind, *options) in spec[section].items():
            if kind not in ("INT", "FLOAT"):
                continue
            low, high = options[0]["min"], options[0]["max"]
            beyond = 1 if kind == "INT" else max(abs(high) * 1e-3, 1e-12)
            assert name in refusal(train, **{**GOOD, name: low - (1 if kind == "INT" else low / 2)})
            assert name in refusal(train, **{**GOOD, name: high + beyond})
            checked += 1
    assert checked == 15
    assert train.VALIDATE_INPUTS(**{**GOOD, "seed": 0xFFFFFFFFFFFFFFFF, "lora_rank": 256, "epochs": 100000}) is True


def test_linked_widgets_arrive_as_none_and_are_not_refused(nodes):
    linked = {name: None for name in ("epochs", "steps", "cfg", "learning_rate", "width", "lora_name", "seed")}
    assert nodes["PRDPTrainLoRA"].VALIDATE_INPUTS(**{**GOOD, **linked}) is True


def test_other_nodes_enforce_their_widgets(nodes):
    apply = nodes["PRDPApplyLoRA"]
    assert apply.VALIDATE_INPUTS(strength=-10.0) is True and apply.VALIDATE_INPUTS(strength=None) is True
    assert "strength=nan: must be a finite number" in refusal(apply, strength=float("nan"))
    assert "strength=10.5: at most 10.0" in refusal(apply, strength=10.5)
    load = nodes["PRDPLoadRewardModel"]
    assert "device='cuda:7' is not one of the choices" in refusal(load, reward="pickscore", weights="(auto)",
                                                                 device="cuda:7")
    assert "must be finite" in refusal(load, reward="weighted", weights="(auto)", components="pickscore:inf")
    score = nodes["PRDPScoreImages"]
    assert score.VALIDATE_INPUTS(prompt="a cat\na dog", label="base") is True
    assert "NUL bytes" in refusal(score, prompt="a\x00", label="")
    assert "label" in refusal(score, prompt="", label="two\nlines")


def test_run_time_enforces_the_limits_too(package):
    """A widget fed by a link skips VALIDATE_INPUTS (None there); build_config checks it at run time."""
    form = __import__(f"{package.__name__}.nodes.train_form", fromlist=["build_config"])
    for change, fragment in (({"epochs": 10 ** 9}, "epochs=1000000000: at most 100000"),
                             ({"lora_rank": 100000}, "lora_rank=100000: at most 256"),
                             ({"learning_rate": float("nan")}, "learning_rate=nan: must be a finite number"),
                             ({"seed": -1}, "seed=-1: at least 0"),
                             ({"flow_guidance": -0.5}, "flow_guidance=-0.5: at least 0"),
                             ({"prompts_per_epoch": 4096, "images_per_prompt": 256}, "GiB")):
        with pytest.raises(ValueError) as refused:
            form.build_config("cpu-smoke", **change)
        assert fragment in str(refused.value)
    spec = package.NODE_CLASS_MAPPINGS["PRDPTrainLoRA"].INPUT_TYPES()
    declared = {name: (options["min"], options["max"]) for section in ("required", "optional")
                for name, (kind, *rest) in spec[section].items() if kind in ("INT", "FLOAT") for options in rest}
    assert declared == form.LIMITS
