"""ComfyUI's own prompt validation (execution.validate_prompt) of a small PRDP graph, in a process
of its own (ComfyUI's top-level `nodes` module must not meet this repository's `nodes` package).

argv: comfyui_root repo_root models_dir; stdin: a JSON list of PRDPTrainLoRA widget dicts.
Prints one line "RESULT <json>": per widget dict, {"valid": bool, "node_errors": {...}}.
"""
import asyncio
import importlib.util
import json
import sys
from pathlib import Path

comfy_root, repo_root, models = sys.argv[1:4]
sys.path.insert(0, comfy_root)
import comfy.options
comfy.options.enable_args_parsing(False)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import folder_paths
folder_paths.add_model_folder_path("checkpoints", models)
import execution  # noqa: E402
import nodes  # noqa: E402

spec = importlib.util.spec_from_file_location("prdp_under_test", Path(repo_root) / "__init__.py",
                                              submodule_search_locations=[repo_root])
package = importlib.util.module_from_spec(spec)
sys.modules["prdp_under_test"] = package
spec.loader.exec_module(package)
nodes.NODE_CLASS_MAPPINGS.update(package.NODE_CLASS_MAPPINGS)

results = []
for widgets in json.loads(sys.stdin.read()):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "PRDPLoadRewardModel", "inputs": {"reward": "jpeg-compressibility", "weights": "(auto)",
                                                               "device": "cpu", "dtype": "auto"}},
        "3": {"class_type": "PRDPTrainLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                         "reward_model": ["2", 0], **widgets}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}},
    }
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("p", prompt, None))
    results.append({"valid": valid, "node_errors": node_errors})
print("RESULT " + json.dumps(results, default=str))
