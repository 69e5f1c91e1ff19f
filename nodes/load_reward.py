"""Load Reward Model (PRDP): a reward by name, its weights file, and where it runs; or a reward
server's URL (`serve-reward`, rewards/remote.py)."""
from __future__ import annotations

import inspect
import math
from typing import Any, Dict, List

import torch

from ..comfyui_prdp import rewards
from ..comfyui_prdp.dependencies import module_missing_message
from ..comfyui_prdp.rewards.model_files import explicit_path_hint
from ..comfyui_prdp.rewards.remote import check_reward_url
from .common import CATEGORY, REWARD_TYPE, comfy_device_name, folder_paths_module, refuse, widget_problems

AUTO_WEIGHTS = "(auto)"
REWARD_FOLDER = "reward_models"
DEVICES = ["auto", "cpu"]
DTYPES = ["auto", "fp32", "fp16", "bf16"]
DEFAULT_COMPONENTS = "pickscore:10, hpsv2:2, aesthetic:0.05"
PROMPT_FREE = ("jpeg-compressibility", "jpeg-incompressibility")
TITLE = "Load Reward Model (PRDP)"
#: the last line of a missing-weights message raised here (the library's says `path=`)
WEIGHTS_HINT = ("or put it in models/reward_models and choose it in this node's `weights` widget "
                "(press R in ComfyUI to refresh the list).")


def weight_files() -> List[str]:
    """Files in models/reward_models (and folders added in extra_model_paths.yaml)."""
    folder_paths = folder_paths_module()
    if folder_paths is None:
        return []
    rewards.register_comfy_folder()
    try:
        return list(folder_paths.get_filename_list(REWARD_FOLDER))
    except KeyError:
        return []


#: rewards with a node of their own (not loaded by name here): human -> PRDP Human Choice Reward
OWN_NODE = ("human",)


def reward_choices() -> List[str]:
    names = [name for name in rewards.available_rewards() if name not in OWN_NODE]
    preferred = "pickscore" if "pickscore" in names else names[0]
    return [preferred] + [n for n in names if n != preferred]


def factory_options(name: str) -> set:
    """Keyword options the reward's factory accepts (everything when it takes **kwargs)."""
    factory = rewards.registered_factory(name)
    if factory is None:
        return set()
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return {"*"}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return {"*"}
    return {p.name for p in parameters}


#: the widgets besides `reward`, each with the factory option it feeds
OPTIONAL_WIDGETS = (("weights", "path"), ("device", "device"), ("dtype", "dtype"),
                    ("allow_download", "allow_download"), ("components", None), ("server_url", None))


def widgets_in_use(reward: str) -> List[str]:
    """The widgets besides `reward` that apply to `reward`: what the frontend shows
    (web/prdp_reward_widgets.js holds the same table; tests/test_reward_widgets.py compares).

    A widget applies when the reward's factory takes its option; components only to 'weighted'
    (which passes device, dtype and allow_download to its parts, never a file); server_url to
    rewards that load a model (a reward server hosts one). Rewards that compute their score
    (JPEG; their factories take anything and use nothing) show none."""
    if reward == "weighted":
        return ["device", "dtype", "allow_download", "components", "server_url"]
    accepted = factory_options(reward)
    if "*" in accepted:
        return []
    used = [widget for widget, option in OPTIONAL_WIDGETS if option in accepted]
    return used + (["server_url"] if "path" in accepted else [])


def reward_kwargs(reward: str, device: str, dtype: str, components: str,
                  allow_download: bool, weights_path: str | None) -> Dict[str, Any]:
    """The options the node passes to the reward's factory (only those it accepts)."""
    accepted = factory_options(reward)
    wanted: Dict[str, Any] = {
        "device": (comfy_device_name() or None) if device == "auto" else device,
        "dtype": None if dtype == "auto" else dtype,
        "allow_download": None if allow_download else False,
    }
    if weights_path is not None:
        wanted["path"] = weights_path
    if reward == "weighted":
        wanted["components"] = components
    if "*" in accepted:
        return wanted
    return {k: v for k, v in wanted.items() if k in accepted}


class PRDPLoadRewardModel:
    DESCRIPTION = ("Loads a reward model for PRDP training and scoring. Weights are looked up in "
                   "models/reward_models (the file names the reward's documentation gives) unless "
                   "you pick a file. Loaded once and reused while the inputs stay the same.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "reward": (reward_choices(), {
                    "tooltip": "Which reward to maximise. 'weighted' combines several (see components); "
                               "the JPEG rewards need no model (quick tests)."}),
                "weights": ([AUTO_WEIGHTS] + weight_files(), {
                    "tooltip": "Weights file in models/reward_models. (auto) finds the reward's "
                               "standard file names there or in the Hugging Face cache."}),
                "device": (DEVICES, {
                    "tooltip": "auto: score on ComfyUI's device (the GPU) and move the model to the CPU "
                               "while the UNet trains; cpu: always on the CPU (saves VRAM, slower)."}),
                "dtype": (DTYPES, {
                    "tooltip": "Precision of the reward model. auto: fp16 on a GPU, fp32 on the CPU."}),
            },
            "optional": {
                "components": ("STRING", {
                    "default": DEFAULT_COMPONENTS,
                    "tooltip": "Only for reward 'weighted': name:weight pairs, e.g. the paper's "
                               "'pickscore:10, hpsv2:2, aesthetic:0.05'."}),
                "allow_download": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Allow downloading missing weights from Hugging Face (never when "
                               "HF_HUB_OFFLINE is set). Off: only local files are used."}),
                "server_url": ("STRING", {
                    "default": "",
                    "tooltip": "A reward server's address, e.g. http://127.0.0.1:8190 (started with "
                               "`python -m comfyui_prdp serve-reward --reward NAME`): images are scored "
                               "there, in its own process; reward, weights, device and dtype are then the "
                               "server's. Empty: the reward is loaded here."}),
            },
        }

    RETURN_TYPES = (REWARD_TYPE,)
    RETURN_NAMES = ("reward_model",)
    OUTPUT_TOOLTIPS = ("The reward, for PRDP Train LoRA and Score Images (PRDP).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, reward=None, weights=None, device=None, dtype=None, components=None,
                        allow_download=None, server_url=None):
        """True, or FormRefused with every problem (see nodes.common.FormRefused)."""
        names = rewards.available_rewards()
        problems = []
        if isinstance(server_url, str) and server_url.strip():
            try:
                check_reward_url(server_url.strip())
            except ValueError as error:
                problems.append(f"server_url: {error}")
            refuse(TITLE, problems)
            return True          # the server's reward: the other widgets are not used
        if reward in OWN_NODE:      # the human reward: its own node (nodes/human_reward.py)
            problems.append(f"{reward!r} is not loaded here: use the node 'PRDP Human Choice Reward'")
        elif reward is not None and reward not in names:
            problems.append(f"unknown reward {reward!r}; choose one of: {', '.join(names)}")
        if weights not in (AUTO_WEIGHTS, None):
            if reward in PROMPT_FREE:
                problems.append(f"{reward} uses no model; set weights to {AUTO_WEIGHTS}")
            elif reward == "weighted":
                problems.append("the weighted reward finds each component's weights itself; set weights to (auto)")
            elif weights not in weight_files():
                problems.append(f"weights file {weights!r} is not in models/reward_models; pick one from the "
                                "list or (auto)")
        others = {"device": device, "dtype": dtype, "components": components, "allow_download": allow_download}
        problems += widget_problems(cls.INPUT_TYPES(), others).values()
        if reward == "weighted" and isinstance(components, str):
            problems += cls._component_problems(components, names)
        refuse(TITLE, problems)
        return True

    @staticmethod
    def _component_problems(components: str, names) -> List[str]:
        try:
            from ..comfyui_prdp.rewards.combined import parse_components
            parsed = parse_components(components)
        except Exception as error:  # noqa: BLE001  (any parse failure is the user's text)
            return [f"components: {error}"]
        problems = []
        unknown = [item[0] for item in parsed if isinstance(item[0], str) and item[0] not in names]
        if unknown:
            problems.append(f"components: unknown reward(s) {', '.join(unknown)}; known: {', '.join(names)}")
        not_finite = [f"{name}:{weight}" for name, weight in parsed if not math.isfinite(weight)]
        if not_finite:
            problems.append(f"components: weights must be finite numbers, not {', '.join(not_finite)}")
        return problems

    def load(self, reward, weights, device, dtype, components=DEFAULT_COMPONENTS, allow_download=True,
             server_url=""):
        if isinstance(server_url, str) and server_url.strip():
            return (rewards.create_reward(check_reward_url(server_url.strip())),)   # asks the server now
        weights_path = None
        if weights != AUTO_WEIGHTS:
            folder_paths = folder_paths_module()
            weights_path = folder_paths.get_full_path_or_raise(REWARD_FOLDER, weights)
        kwargs = reward_kwargs(reward, device, dtype, components, allow_download, weights_path)
        # a weighted mix takes no file from `weights`: its messages name the folders only
        hint = None if reward == "weighted" else WEIGHTS_HINT
        # ComfyUI shows an error as "<module.path.Type>: <message>": raise built-in types so the
        # message comes first (the library's own types stay for Python callers)
        try:
            # ComfyUI runs nodes under inference mode; the training job uses the reward outside it,
            # so its modules are built as ordinary tensors (rewards also repair them when they move)
            with torch.inference_mode(False), explicit_path_hint(hint):
                return (rewards.create_reward(reward, **kwargs),)
        except rewards.RewardModelNotFoundError as error:
            raise FileNotFoundError(str(error)) from None
        except rewards.RewardModelFileError as error:
            raise RuntimeError(str(error)) from None
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(module_missing_message(error), name=error.name) from None
