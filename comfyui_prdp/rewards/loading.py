"""Reading weight files with clear errors, the model cache, the device/dtype policy, and the
options every model reward's factory takes."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Iterable, Iterator, Mapping, Optional, Union

import torch

from .model_files import ModelFiles, PathLike, resolve_model_path

logger = logging.getLogger(__name__)

DtypeLike = Union[None, str, torch.dtype]
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


class RewardModelFileError(RuntimeError):
    """A weight file exists but is not what the reward model expects (corrupt, truncated, other model)."""


# --- device and dtype -------------------------------------------------------------------------

#: the device rewards built inside `default_device(...)` resolve None / 'auto' to
_DEFAULT_DEVICE: contextvars.ContextVar[Optional[torch.device]] = contextvars.ContextVar(
    "prdp_reward_default_device", default=None)


@contextlib.contextmanager
def default_device(device: Union[None, str, torch.device]) -> Iterator[None]:
    """Rewards built inside resolve device None / 'auto' to `device` (None: no change).

    The command line builds its reward inside one with the trainer's device, so `--device cuda:1`
    (or cpu) places every model reward there, the components of a weighted mix included; a
    bare 'cuda' would mean the current GPU, cuda:0 unless torch.cuda.set_device chose another."""
    token = _DEFAULT_DEVICE.set(None if device is None or device == "auto" else torch.device(device))
    try:
        yield
    finally:
        _DEFAULT_DEVICE.reset(token)


def resolve_device(device: Union[None, str, torch.device] = None) -> torch.device:
    """None / 'auto': the device of the enclosing `default_device(...)`, else the GPU when
    there is one, else the CPU. A GPU that is not there is refused."""
    if device is None or device == "auto":
        device = _DEFAULT_DEVICE.get()
        if device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        check_cuda_device(resolved, device)
    return resolved


def check_cuda_device(resolved: torch.device, named: Union[str, torch.device]) -> None:
    """ValueError unless `resolved` (a cuda device) exists here."""
    if not torch.cuda.is_available():
        raise ValueError(f"device={str(named)!r} but no CUDA GPU is available; use device='cpu' "
                         "(or leave it unset to pick the GPU only when there is one)")
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(f"device={str(named)!r} but this machine has {count} CUDA GPU(s), numbered from 0; "
                         f"use cuda:0 .. cuda:{count - 1}")


def resolve_dtype(dtype: DtypeLike, device: torch.device) -> torch.dtype:
    """None: fp16 on a GPU, fp32 elsewhere. Strings: fp32/fp16/bf16 (and long names)."""
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        resolved = _DTYPES[dtype.lower()]
    else:
        raise ValueError(f"dtype={dtype!r}: use one of fp32, fp16, bf16")
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype={dtype!r}: use one of fp32, fp16, bf16")
    return resolved


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


# --- the options every model reward takes -----------------------------------------------------

DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class RewardOptions:
    """Where a model reward looks for its files (model_dir, allow_download) and how it scores
    (device, dtype, batch_size: checked by ModelReward)."""

    model_dir: Any = None
    allow_download: Optional[bool] = None
    device: Any = None
    dtype: DtypeLike = None
    batch_size: int = DEFAULT_BATCH_SIZE

    def locate(self, files: ModelFiles, path: Optional[PathLike] = None, *,
               local_only: bool = False) -> Path:
        """The local file or folder for `files` (see model_files.resolve_model_path).

        local_only: never download (for files that have no known source)."""
        return resolve_model_path(files, path, model_dir=self.model_dir,
                                  allow_download=False if local_only else self.allow_download)

    @property
    def scoring(self) -> Dict[str, Any]:
        """device, dtype and batch_size, as keyword arguments for ModelReward."""
        return {"device": self.device, "dtype": self.dtype, "batch_size": self.batch_size}


_KEYWORD = inspect.Parameter.KEYWORD_ONLY
_SHARED_PARAMETERS = (
    inspect.Parameter("model_dir", _KEYWORD, default=None),
    inspect.Parameter("allow_download", _KEYWORD, default=None, annotation="Optional[bool]"),
    inspect.Parameter("device", _KEYWORD, default=None),
    inspect.Parameter("dtype", _KEYWORD, default=None),
    inspect.Parameter("batch_size", _KEYWORD, default=DEFAULT_BATCH_SIZE, annotation="int"),
)


def reward_factory(build: Callable[..., Any]) -> Callable[..., Any]:
    """A model reward's factory from `build(<its own parameters>, *, options: RewardOptions)`.

    The factory takes build's own parameters followed by the shared keyword options
    (model_dir, allow_download, device, dtype, batch_size) and shows them all in its signature
    (the Load Reward node reads it); unknown options raise TypeError as for any function.
    """
    own = inspect.signature(build)
    if "options" not in own.parameters:
        raise TypeError(f"{build.__name__} must take a keyword-only 'options' parameter")
    parameters = [p for name, p in own.parameters.items() if name != "options"]
    public = own.replace(parameters=parameters + list(_SHARED_PARAMETERS))
    shared_names = [p.name for p in _SHARED_PARAMETERS]

    @functools.wraps(build)
    def factory(*args: Any, **kwargs: Any) -> Any:
        bound = public.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        options = RewardOptions(**{name: values.pop(name) for name in shared_names})
        return build(**values, options=options)

    factory.__signature__ = public
    return factory


# --- reading files ----------------------------------------------------------------------------

def read_state_dict(path: Path, expected: str) -> Dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch file, on the CPU.

    A `{"state_dict": ...}` wrapper (HPS) is unwrapped. Anything unreadable, or not a mapping
    of tensors, raises RewardModelFileError naming the file and `expected`.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (pickle, zip, safetensors and OS errors alike)
        raise RewardModelFileError(
            f"could not read {path} ({path.stat().st_size if path.exists() else 0} bytes) as "
            f"{expected}: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}. "
            "The file is probably incomplete or corrupt (download it again), or it is a "
            "different model."
        ) from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not loaded:
        raise RewardModelFileError(
            f"{path} does not hold a state dict (found {type(loaded).__name__}); expected {expected}.")
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise RewardModelFileError(f"{path} holds no tensors; expected {expected}.")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def load_weights_into(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    path: Path,
    expected: str,
    ignore_missing: Iterable[str] = (),
) -> None:
    """`module.load_state_dict` with messages that name the file and what was expected.

    Missing keys and shape mismatches are errors (a reward on random weights is worse than none);
    unexpected extra keys are logged and ignored.
    """
    own = module.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if mismatched:
        first = mismatched[0]
        raise RewardModelFileError(
            f"{path} does not match {expected}: {len(mismatched)} tensor(s) have other shapes, "
            f"e.g. {first}: {tuple(state_dict[first].shape)} in the file, "
            f"{tuple(own[first].shape)} expected. Is it the right model (or architecture)?")
    result = module.load_state_dict(dict(state_dict), strict=False)
    ignore = set(ignore_missing)
    missing = [k for k in result.missing_keys if k not in ignore]
    if missing:
        raise RewardModelFileError(
            f"{path} is not {expected}: {len(missing)} of {len(own)} weights are missing "
            f"(e.g. {', '.join(missing[:3])}); found keys like "
            f"{', '.join(list(state_dict)[:3])}.")
    if result.unexpected_keys:
        logger.info("%s: ignored %d extra tensors (e.g. %s)", path, len(result.unexpected_keys),
                    result.unexpected_keys[0])


# --- the model cache --------------------------------------------------------------------------

_CACHE: Dict[Hashable, object] = {}
_CACHE_LOCK = threading.RLock()


def cached_model(key: Hashable, build: Callable[[], object]) -> object:
    """One instance per key for the life of the process (key: (kind, resolved path, dtype))."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def clear_model_cache() -> None:
    """Forget every loaded reward model (they are freed once no reward holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def cached_model_keys() -> list:
    with _CACHE_LOCK:
        return list(_CACHE)


_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "zeros_", "ones_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
    "sparse_",
)


_SKIP_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    """Build modules without random initialisation (their weights are loaded right after).

    Only safe when every parameter is then overwritten: callers check for missing keys.
    Other threads keep initialising normally (the patched functions check the caller's thread).
    """
    owner = threading.get_ident()
    with _SKIP_INIT_LOCK:
        saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS
                 if hasattr(torch.nn.init, name)}

        def skipper(original):
            def maybe_init(tensor, *args, **kwargs):
                if threading.get_ident() == owner:
                    return tensor
                return original(tensor, *args, **kwargs)
            return maybe_init

        try:
            for name, function in saved.items():
                setattr(torch.nn.init, name, skipper(function))
            yield
        finally:
            for name, function in saved.items():
                setattr(torch.nn.init, name, function)


def freeze(module: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """Eval mode, no parameter gradients (gradients still flow to the inputs), optional dtype."""
    module.eval()
    module.requires_grad_(False)
    if dtype is not None:
        module.to(dtype=dtype)
    return module
