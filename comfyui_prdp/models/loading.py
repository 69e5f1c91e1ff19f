"""Resolve `--base` to a `DiffusersBackend`, never downloading anything.

- None (or "embedded-tiny-sd"): the embedded tiny model, built from configs.
- a diffusers directory (has model_index.json): `StableDiffusionPipeline.from_pretrained`, or
  `StableDiffusionXLPipeline` where it has text_encoder_2 (SDXL and finetunes), or the flow
  pipelines `StableDiffusion3Pipeline` (SD3 / SD3.5) and `FluxPipeline` (Flux.1) by their class.
- a single-file checkpoint (.safetensors/.ckpt/.pt/.pth): `from_single_file`, with the component
  configs from `base_config` (a local diffusers directory) or from the local Hugging Face cache.
  SD3 / Flux single files are refused with what to pass instead (their text encoders and
  configs are not in the file, so they would need a download).
- a hub id such as "stable-diffusion-v1-5/stable-diffusion-v1-5": the local Hugging Face cache.
Anything else gets an error that says what to pass instead.

Weights load in the dtype the backend trains them in (`frozen_weight_dtype`: fp16 / bf16 on CUDA
with mixed precision), never in float32 first: the VAE stays float32, and so does T5 under fp16.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from ..backends.diffusers_backend import DiffusersBackend, frozen_weight_dtype, resolve_device
from ..config import TrainConfig
from .embedded import MODEL_NAME as EMBEDDED_NAME, build_embedded_pipeline

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
COMPONENTS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
SDXL_COMPONENTS = COMPONENTS + ("text_encoder_2", "tokenizer_2")
#: flow-matching pipelines (model_index.json's _class_name) -> the components their backend needs
FLOW_COMPONENTS = {
    "StableDiffusion3Pipeline": ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer",
                                 "tokenizer_2"),
    "FluxPipeline": ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
}
#: optional components of a flow pipeline (SD3's T5 may be left out)
FLOW_OPTIONAL = {"StableDiffusion3Pipeline": ("text_encoder_3", "tokenizer_3"), "FluxPipeline": ()}
#: the T5 encoder of each flow pipeline: float32 under fp16, whose range its activations overflow
FLOW_T5 = {"StableDiffusion3Pipeline": "text_encoder_3", "FluxPipeline": "text_encoder_2"}
#: the first diffusers that takes `dtype` (before: `torch_dtype`, deprecated since)
_DTYPE_KEYWORD_SINCE = "0.40"
#: single-file model types (diffusers' names) of flow models, refused with what to pass instead
FLOW_SINGLE_FILE_PREFIXES = ("sd3", "flux")
# single-file model types (diffusers' names) whose layout the diffusers backend runs
SUPPORTED_SINGLE_FILE_TYPES = ("v1", "v2", "xl_base")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CONFIG_PATTERNS = ["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"]


class ModelLoadError(ValueError):
    """The base model cannot be loaded as given; the message says what to do instead."""


def load_backend(base: Optional[str], config: TrainConfig, device: Union[str, torch.device, None] = None,
                 base_config: Optional[str] = None) -> DiffusersBackend:
    """A `DiffusersBackend` for `base` (see the module docstring), LoRA set up from `config`."""
    check_device(device)
    dtype = frozen_weight_dtype(resolve_device(device), config.mixed_precision)
    components, name = load_components(base, base_config=base_config, dtype=dtype)
    if components.get("transformer") is not None:
        return flow_backend(components, config, device=device, model_name=name)
    if components.get("text_encoder_2") is not None:
        from ..backends.diffusers_sdxl import DiffusersSDXLBackend

        return DiffusersSDXLBackend(**components, config=config, device=device, model_name=name)
    components = {key: components[key] for key in COMPONENTS}
    return DiffusersBackend.from_components(**components, config=config, device=device, model_name=name)


def flow_backend(components: Dict[str, object], config: TrainConfig, device=None, model_name: str = "unknown"):
    """The SD3 or Flux backend for a flow pipeline's components (by the transformer's class)."""
    from ..backends.diffusers_flow import DiffusersFluxBackend, DiffusersSD3Backend

    kind = type(components["transformer"]).__name__
    if kind == "SD3Transformer2DModel":
        return DiffusersSD3Backend(**components, config=config, device=device, model_name=model_name)
    if kind == "FluxTransformer2DModel":
        return DiffusersFluxBackend(**components, config=config, device=device, model_name=model_name)
    raise ModelLoadError(f"the transformer is a {kind}; the diffusers flow backend runs SD3 (SD3Transformer2DModel) "
                         "and Flux.1 (FluxTransformer2DModel)")


def check_device(device: Union[str, torch.device, None]) -> Optional[torch.device]:
    """`device` as a torch.device (None stays None: the backend's default), or ModelLoadError when
    it is not a device name or not present here. Cheap: meant to run before anything loads."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"device {device!r} is not a device name: use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r}: no CUDA GPU is usable here (torch {torch.__version__}, "
                                 f"built for CUDA {torch.version.cuda}); use the device cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ModelLoadError(f"device {device!r}: this machine has {count} CUDA GPU(s), numbered from 0; "
                                 f"use cuda:0 .. cuda:{count - 1}")
        return parsed
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ModelLoadError(f"device {device!r}: Apple's MPS is not available here; use cpu")
        return parsed
    raise ModelLoadError(f"device {device!r}: the trainer runs on cpu, cuda[:N] or mps")


def checked_config_dir(base_config: str) -> Path:
    """The --base-config folder, which must be a sound local diffusers model folder."""
    config_dir = Path(base_config).expanduser()
    if not config_dir.is_dir():
        raise FileNotFoundError(f"base config {base_config!r} is not a directory: pass a local diffusers model "
                                "directory whose configs match the checkpoint")
    check_diffusers_dir(config_dir)
    return config_dir


def check_model_folders(base: Optional[str], base_config: Optional[str] = None) -> None:
    """Cheap checks before anything loads: a --base folder and a --base-config folder must be
    diffusers models with a sound model_index.json (ModelLoadError / FileNotFoundError otherwise)."""
    if base is not None and Path(str(base)).expanduser().is_dir():
        check_diffusers_dir(Path(str(base)).expanduser())
    if base is not None:
        refuse_flow_single_file(Path(str(base)).expanduser())
    if base_config is not None:
        checked_config_dir(base_config)


def load_components(base: Optional[str], base_config: Optional[str] = None,
                    dtype: torch.dtype = torch.float32) -> Tuple[Dict[str, object], str]:
    """({unet, text_encoder, tokenizer, vae, scheduler}, model name) for `base`, on the CPU, the
    weights of a loaded model in `dtype` (see `component_dtypes`; the embedded models are built in float32)."""
    if base is None or str(base).strip() in ("", EMBEDDED_NAME):
        return build_embedded_pipeline(0), EMBEDDED_NAME
    if str(base).strip() == "embedded-world":    # the miniature world's model (comfyui_prdp/world)
        from ..world.model import MODEL_NAME as WORLD_NAME, build_world_pipeline
        return build_world_pipeline(0), WORLD_NAME
    base = str(base)
    path = Path(base).expanduser()
    if path.is_dir():
        return _pipeline_components(_from_diffusers_dir(path, dtype)), path.resolve().name
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"{path} is not a model checkpoint: pass a diffusers directory or a single-file "
                                 f"checkpoint ending in {', '.join(SINGLE_FILE_SUFFIXES)}")
        return _pipeline_components(_from_single_file(path, base_config, dtype)), path.stem
    if _HUB_ID.match(base) and not base.startswith((".", "~")):
        return _pipeline_components(_from_hub_cache(base, dtype)), base
    raise FileNotFoundError(f"base model {base!r} not found: pass an existing diffusers directory, a single-file "
                            "checkpoint (.safetensors/.ckpt), a hub id already in the local Hugging Face cache, "
                            "or nothing for the embedded tiny model")


def _pipeline_components(pipe) -> Dict[str, object]:
    flow = type(pipe).__name__
    if flow in FLOW_COMPONENTS:
        return {name: getattr(pipe, name, None) for name in FLOW_COMPONENTS[flow] + FLOW_OPTIONAL[flow]}
    names = SDXL_COMPONENTS if getattr(pipe, "text_encoder_2", None) is not None else COMPONENTS
    return {name: getattr(pipe, name) for name in names}


def _sd_pipeline_class(sdxl: bool = False):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    return StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline


def _is_sdxl_dir(path: Path) -> bool:
    import json

    return "text_encoder_2" in json.loads((path / "model_index.json").read_text(encoding="utf-8"))


_NO_SAFETY_CHECKER = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def check_diffusers_dir(path: Path) -> None:
    """Raise ModelLoadError unless `path` holds a Stable-Diffusion-style diffusers model."""
    import json

    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"{path} is a directory without model_index.json, so not a diffusers model: pass the "
                             "folder a pipeline was saved to with save_pretrained, or a single-file checkpoint")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{index_file} is not readable JSON ({error}): the model folder is damaged") from error
    if not isinstance(index, dict):
        raise ModelLoadError(f"{index_file} holds {type(index).__name__} {str(index)[:40]}, not the JSON object "
                             "a diffusers model_index.json is: the model folder is damaged; save the pipeline "
                             "again with save_pretrained")
    flow = index.get("_class_name") if index.get("_class_name") in FLOW_COMPONENTS else None
    if flow is None and ("transformer" in index or "unet" not in index and "prior" in index):
        raise ModelLoadError(f"{path} is a {index.get('_class_name', 'non-UNet')} model; the diffusers backend "
                             "runs UNet models (Stable Diffusion 1.x/2.x, SDXL) and the flow pipelines "
                             f"{' and '.join(FLOW_COMPONENTS)} (SD3 / SD3.5, Flux.1)")
    if flow is not None:
        required = FLOW_COMPONENTS[flow]
    else:
        required = SDXL_COMPONENTS if "text_encoder_2" in index else COMPONENTS
    missing = [name for name in required if name not in index or index[name] == [None, None]]   # how diffusers saves an absent component
    if missing:
        kind = f"a {flow}" if flow else "an SDXL" if "text_encoder_2" in index else "a Stable Diffusion"
        raise ModelLoadError(f"{path} lacks the component(s) {', '.join(missing)} {kind} pipeline needs")
    malformed = [name for name in required if not (isinstance(index[name], list) and len(index[name]) == 2
                                                      and all(isinstance(part, str) for part in index[name]))]
    if malformed:
        raise ModelLoadError(f"{index_file}: the entries {', '.join(malformed)} must each be [library, class], "
                             'e.g. "unet": ["diffusers", "UNet2DConditionModel"]; the model folder is damaged')


def component_dtypes(dtype: torch.dtype, pipeline: Optional[str] = None) -> Dict[str, torch.dtype]:
    """diffusers' per-component dtype for a pipeline class: `dtype`, except the VAE (float32) and,
    under fp16, a flow pipeline's T5 (float32)."""
    dtypes = {"default": dtype, "vae": torch.float32}
    if dtype == torch.float16 and pipeline in FLOW_T5:
        dtypes[FLOW_T5[pipeline]] = torch.float32
    return dtypes


def dtype_keyword(value) -> Dict[str, object]:
    """{"dtype": value} for the diffusers installed here, or {"torch_dtype": value} before 0.40."""
    import diffusers
    from packaging.version import Version

    new = Version(diffusers.__version__).release >= Version(_DTYPE_KEYWORD_SINCE).release
    return {"dtype" if new else "torch_dtype": value}


def _from_diffusers_dir(path: Path, dtype: torch.dtype = torch.float32):
    check_diffusers_dir(path)
    try:
        flow = _flow_pipeline_class(path)
        if flow is not None:
            return flow.from_pretrained(str(path), local_files_only=True, **_absent_optional(path, flow.__name__),
                                        **dtype_keyword(component_dtypes(dtype, flow.__name__)))
        pipeline = _sd_pipeline_class(sdxl=_is_sdxl_dir(path))
        extra = {} if _is_sdxl_dir(path) else _NO_SAFETY_CHECKER
        return pipeline.from_pretrained(str(path), local_files_only=True, **extra,
                                        **dtype_keyword(component_dtypes(dtype)))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load the diffusers model in {path}: {error}") from error


def _flow_pipeline_class(path: Path):
    """diffusers' StableDiffusion3Pipeline / FluxPipeline where model_index.json names one, else None."""
    import json

    name = json.loads((path / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    if name not in FLOW_COMPONENTS:
        return None
    import diffusers
    return getattr(diffusers, name)


def _absent_optional(path: Path, pipeline: str) -> Dict[str, None]:
    """{name: None} for the optional components (SD3's T5) a saved folder lacks: diffusers
    refuses to build the pipeline unless they are passed as None."""
    import json

    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    return {name: None for name in FLOW_OPTIONAL[pipeline] if index.get(name) in (None, [None, None])}


def _cached_flow_dir(repo_id: str) -> Optional[Path]:
    """The cached snapshot folder of a hub id whose model_index.json names a flow pipeline, else None."""
    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(repo_id, "model_index.json")
    if not isinstance(index, str):
        return None
    folder = Path(index).parent
    return folder if _flow_pipeline_class(folder) is not None else None


def _from_hub_cache(repo_id: str, dtype: torch.dtype = torch.float32):
    flow_dir = _cached_flow_dir(repo_id)
    if flow_dir is not None:
        return _from_diffusers_dir(flow_dir, dtype)
    try:
        return _sd_pipeline_class().from_pretrained(repo_id, local_files_only=True, **_NO_SAFETY_CHECKER,
                                                    **dtype_keyword(component_dtypes(dtype)))
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"{repo_id!r} is not in the local Hugging Face cache and nothing is downloaded here. On a machine "
            f"with network run `huggingface-cli download {repo_id}` (or `hf download {repo_id}`) and copy the cache "
            f"(~/.cache/huggingface) here, or pass a local diffusers directory or a single-file checkpoint "
            f"as the base model (if {repo_id!r} was meant as a local path: it does not exist). "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error


def _from_single_file(path: Path, base_config: Optional[str], dtype: torch.dtype = torch.float32):
    if base_config is not None:
        config_dir = checked_config_dir(base_config)
        refuse_flow_single_file(path)
    else:
        refuse_flow_single_file(path)
        config_dir = _cached_default_config(path)
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    try:
        sdxl = _is_sdxl_dir(config_dir)
        extra = {} if sdxl else dict(_NO_SAFETY_CHECKER)
        if dtype != torch.float32:      # the pipeline takes one dtype: the VAE loads on its own, in float32
            extra["vae"] = _single_file_vae(path, config_dir)
        pipe = _sd_pipeline_class(sdxl=sdxl).from_single_file(str(path), config=str(config_dir),
                                                              local_files_only=True, **extra,
                                                              **dtype_keyword(dtype))
    except (OSError, ValueError, KeyError, RuntimeError, SingleFileComponentError) as error:
        raise ModelLoadError(f"could not load {path} with the configs in {config_dir}: {error}. Check that the "
                             "config directory describes the same architecture as the checkpoint") from error
    pipe.scheduler = scheduler_for_markers(pipe.scheduler, set(_checkpoint_view(path).keys()))
    return pipe


def _single_file_vae(path: Path, config_dir: Path):
    """The VAE of a single-file checkpoint, in float32 (the backend decodes in float32)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_single_file(str(path), config=str(config_dir), subfolder="vae", local_files_only=True,
                                          **dtype_keyword(torch.float32))


def scheduler_for_markers(scheduler, keys):
    """The schedule a single-file checkpoint declares with the marker keys ComfyUI and kohya read:
    `v_pred` (v-prediction) and `ztsnr` (zero terminal SNR). A config folder made for the eps
    base model would otherwise train a v-prediction finetune (NoobAI-v, ...) with the wrong
    parameterisation."""
    v_pred, ztsnr = "v_pred" in keys, "ztsnr" in keys
    config = scheduler.config
    if not v_pred and not ztsnr:
        return scheduler
    if config.get("prediction_type", "epsilon") == "v_prediction" and (
            not ztsnr or config.get("rescale_betas_zero_snr", False)):
        return scheduler
    from diffusers import DDIMScheduler

    overrides = {"prediction_type": "v_prediction" if v_pred else config.get("prediction_type", "epsilon"),
                 "rescale_betas_zero_snr": ztsnr or bool(config.get("rescale_betas_zero_snr", False)),
                 "clip_sample": bool(config.get("clip_sample", False)),
                 "thresholding": bool(config.get("thresholding", False))}
    return DDIMScheduler.from_config(config, **overrides)


class _LazySafetensors:
    """A read-only mapping over a .safetensors file that loads only the tensors asked for."""

    def __init__(self, path: Path):
        from safetensors import safe_open
        self._file = safe_open(str(path), framework="pt")
        self._keys = set(self._file.keys())

    def __contains__(self, key) -> bool:
        return key in self._keys

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def keys(self):
        return self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _checkpoint_view(path: Path):
    if path.suffix.lower() == ".safetensors":
        return _LazySafetensors(path)
    state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def single_file_model_type(path: Path) -> str:
    """diffusers' name for the architecture of a single-file checkpoint ("v1", "v2", "xl_base", ...)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        return infer_diffusers_model_type(_checkpoint_view(path))
    except Exception as error:  # a damaged or foreign file: say so instead of a deep traceback
        raise ModelLoadError(f"{path} could not be read as a Stable Diffusion checkpoint: {error}") from error


def refuse_flow_single_file(path: Path) -> None:
    """ModelLoadError for a single-file SD3 / Flux checkpoint (checked before anything loads)."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return
    try:
        model_type = single_file_model_type(path)
    except ModelLoadError:
        return                       # not readable: the loader says so where it reads it
    if model_type.startswith(FLOW_SINGLE_FILE_PREFIXES):
        raise ModelLoadError(
            f"{path} is a single-file {model_type!r} checkpoint; building its pipeline needs configs and text "
            "encoders (CLIP, T5) that are not in the file and would have to be downloaded, which does not happen "
            "here: pass a local diffusers folder of the model (StableDiffusion3Pipeline / FluxPipeline saved with "
            "save_pretrained, e.g. from `hf download` on a machine with network) as --base, or train it with the "
            "ComfyUI nodes, which load single files")


def _cached_default_config(path: Path) -> Path:
    """The diffusers configs for the checkpoint's architecture from the local HF cache, or a clear error."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS
    from huggingface_hub import snapshot_download

    model_type = single_file_model_type(path)
    if model_type not in SUPPORTED_SINGLE_FILE_TYPES:
        raise ModelLoadError(f"{path} looks like a {model_type!r} checkpoint; the diffusers backend runs Stable "
                             "Diffusion 1.x/2.x and SDXL base checkpoints (use the ComfyUI nodes for other models)")
    repo_id = DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=_CONFIG_PATTERNS))
    except Exception as error:
        raise ModelLoadError(
            f"{path} is a single-file SD {model_type} checkpoint; building it needs the diffusers configs of "
            f"{repo_id!r} (component configs and tokenizer, a few kB), which are not in the local Hugging Face "
            "cache, and nothing is downloaded here. Do one of: (1) pass a local diffusers directory of the same "
            "architecture as the base config (Python: load_backend(..., base_config=DIR); CLI: --base-config DIR), "
            f"(2) on a machine with network run `huggingface-cli download {repo_id} --include '*.json' '*.txt'` "
            "and copy ~/.cache/huggingface here, or (3) convert the checkpoint to a diffusers directory and pass "
            f"that directory as the base. ({type(error).__name__})") from error
