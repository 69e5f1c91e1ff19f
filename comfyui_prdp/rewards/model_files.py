"""Where reward-model weights live, and how a name becomes a local path.

Search order for one model:
  1. an explicit `path` (a file or folder; a bare name is also looked up in the folders below;
     a string like "org/name" that is not a local path is taken as a Hugging Face repo id);
  2. the reward-model folders: `model_dir=` arguments, the `PRDP_REWARD_MODELS` environment
     variable (os.pathsep-separated) and, inside ComfyUI, every folder registered under
     "reward_models" (models/reward_models plus any from extra_model_paths.yaml);
  3. the Hugging Face cache (never touching the network);
  4. a download into the Hugging Face cache, only if allowed (`allow_download`, default: on
     unless HF_HUB_OFFLINE is set); network errors are caught and reported.
Nothing found: `RewardModelNotFoundError` naming the exact files and where to put them.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

logger = logging.getLogger(__name__)

COMFY_FOLDER_NAME = "reward_models"
ENV_MODEL_DIRS = "PRDP_REWARD_MODELS"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

PathLike = Union[str, os.PathLike]


class RewardModelNotFoundError(FileNotFoundError):
    """No weights for a reward model anywhere we may look; the message says what to put where."""


#: the last line of a not-found message: how to name the file by hand. The command line and the
#: Python API take `path=`; the Load Reward node says its `weights` widget (None: no such line)
_NAME_IT_YOURSELF: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "prdp_name_it_yourself", default="or pass path=<the file or folder>.")


@contextlib.contextmanager
def explicit_path_hint(hint: Optional[str]) -> Iterator[None]:
    """Not-found messages raised inside end with `hint` (None: without that line)."""
    token = _NAME_IT_YOURSELF.set(hint)
    try:
        yield
    finally:
        _NAME_IT_YOURSELF.reset(token)


@dataclass(frozen=True)
class ModelFiles:
    """What one model needs on disk and where it can come from.

    label: human name used in messages ("PickScore model").
    local_names: accepted names of the file (or folder, when `is_dir`) in a reward-model folder;
        the first one is the name we ask users to use.
    hf_repo / hf_filename: the Hugging Face source (hf_filename only for single files).
    is_dir: a transformers-style folder (config.json + model.safetensors or pytorch_model.bin).
    needs: a short description of the required files, for messages.
    required_files: files a folder must hold to be used.
    """

    label: str
    local_names: Tuple[str, ...]
    hf_repo: Optional[str] = None
    hf_filename: Optional[str] = None
    is_dir: bool = False
    needs: str = ""
    required_files: Tuple[str, ...] = ("config.json",)
    #: folders only: whether a weight file (model.safetensors / pytorch_model.bin) is required,
    #: and which repo files to download (None: json/txt files plus the weights)
    needs_weights: bool = True
    download_patterns: Optional[Tuple[str, ...]] = None

    def describe_needs(self) -> str:
        if self.needs:
            return self.needs
        if self.is_dir:
            return "config.json and model.safetensors (or pytorch_model.bin)"
        return self.hf_filename or self.local_names[0]


# --- ComfyUI integration ----------------------------------------------------------------------

def register_comfy_folder() -> bool:
    """Register models/reward_models with ComfyUI's folder_paths (idempotent).

    Returns False outside ComfyUI (folder_paths not importable). Folders added through
    extra_model_paths.yaml under the "reward_models" key are kept.
    """
    try:
        import folder_paths  # type: ignore  # ComfyUI's module; only importable inside ComfyUI
    except ImportError:
        return False
    default = os.path.join(folder_paths.models_dir, COMFY_FOLDER_NAME)
    try:
        known = folder_paths.get_folder_paths(COMFY_FOLDER_NAME)
    except KeyError:
        known = []
    if default not in known:
        folder_paths.add_model_folder_path(COMFY_FOLDER_NAME, default, is_default=True)
    return True


def comfy_reward_folders() -> List[Path]:
    """The reward-model folders ComfyUI knows about ([] outside ComfyUI)."""
    if not register_comfy_folder():
        return []
    import folder_paths  # type: ignore

    return [Path(p) for p in folder_paths.get_folder_paths(COMFY_FOLDER_NAME)]


def reward_model_folders(model_dir: Union[None, PathLike, Sequence[PathLike]] = None) -> List[Path]:
    """Folders searched for weights, in order: model_dir, $PRDP_REWARD_MODELS, ComfyUI's."""
    folders: List[Path] = []
    if model_dir is not None:
        dirs = [model_dir] if isinstance(model_dir, (str, os.PathLike)) else list(model_dir)
        folders.extend(Path(d).expanduser() for d in dirs)
    env = os.environ.get(ENV_MODEL_DIRS, "")
    folders.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p.strip())
    folders.extend(comfy_reward_folders())
    unique: List[Path] = []
    for folder in folders:
        if folder not in unique:
            unique.append(folder)
    return unique


# --- resolution -------------------------------------------------------------------------------

def downloads_allowed(allow_download: Optional[bool]) -> bool:
    if allow_download is not None:
        return bool(allow_download)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on")


def _missing_in_folder(folder: Path, spec: ModelFiles) -> List[str]:
    missing = [f for f in spec.required_files if not (folder / f).is_file()]
    if not _has_weights(folder, spec):
        missing.append(" or ".join(_WEIGHT_FILES))
    return missing


def _usable(candidate: Path, spec: ModelFiles) -> bool:
    if spec.is_dir:
        return candidate.is_dir() and not _missing_in_folder(candidate, spec)
    return candidate.is_file()


def _copy_of(spec: ModelFiles) -> str:
    return f" (a copy of https://huggingface.co/{spec.hf_repo})" if spec.hf_repo else ""


def _check_explicit(candidate: Path, spec: ModelFiles) -> Path:
    """An explicit path must be of the right kind; say what is wrong otherwise."""
    if spec.is_dir:
        if candidate.is_file() and _usable(candidate.parent, spec):
            return candidate.parent  # a file inside a model folder (what ComfyUI's lists show)
        if not candidate.is_dir():
            raise RewardModelNotFoundError(
                f"{spec.label}: {candidate} is not a folder; expected a folder holding "
                f"{spec.describe_needs()}{_copy_of(spec)}."
            )
        missing = _missing_in_folder(candidate, spec)
        if missing:
            raise RewardModelNotFoundError(
                f"{spec.label}: folder {candidate} lacks {', '.join(missing)}; expected "
                f"{spec.describe_needs()}{_copy_of(spec)}."
            )
        return candidate
    if candidate.is_dir():
        raise RewardModelNotFoundError(
            f"{spec.label}: {candidate} is a folder; expected the weight file "
            f"{spec.describe_needs()}."
        )
    return candidate


def _from_hf_cache(repo: str, spec: ModelFiles, download: bool) -> Tuple[Optional[Path], str]:
    """(path, "") from the HF cache or a download; (None, reason) when neither worked."""
    try:
        import huggingface_hub
    except ImportError:
        return None, "huggingface_hub is not installed"
    reasons = []
    for local_only in ((True, False) if download else (True,)):
        try:
            if spec.is_dir:
                folder = _snapshot(huggingface_hub, repo, spec, local_only)
                if _usable(folder, spec):
                    return folder, ""
                reasons.append(f"the cached copy of {repo} is incomplete")
            else:
                file = huggingface_hub.hf_hub_download(
                    repo, spec.hf_filename, local_files_only=local_only)
                return Path(file), ""
        except Exception as error:  # noqa: BLE001  (offline, no cache, HTTP, network: all "not here")
            if local_only:
                reasons.append("not in the Hugging Face cache")
            else:
                reasons.append(f"download failed ({type(error).__name__}: {str(error)[:200]})")
    if not download:
        reasons.append("downloading is off (allow_download=False or HF_HUB_OFFLINE=1)")
    return None, "; ".join(reasons)


def _has_weights(folder: Path, spec: ModelFiles) -> bool:
    return not spec.needs_weights or any((folder / w).is_file() for w in _WEIGHT_FILES)


def _snapshot(huggingface_hub, repo: str, spec: ModelFiles, local_only: bool) -> Path:
    """The repo's folder from the cache, or downloaded (safetensors preferred over .bin)."""
    if local_only:
        return Path(huggingface_hub.snapshot_download(repo, local_files_only=True))
    if spec.download_patterns is not None:
        return Path(huggingface_hub.snapshot_download(repo, allow_patterns=list(spec.download_patterns)))
    folder = Path(huggingface_hub.snapshot_download(
        repo, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    if not _has_weights(folder, spec):
        folder = Path(huggingface_hub.snapshot_download(
            repo, allow_patterns=["*.json", "*.txt", "pytorch_model.bin"]))
    return folder


def resolve_model_path(
    spec: ModelFiles,
    path: Optional[PathLike] = None,
    *,
    model_dir: Union[None, PathLike, Sequence[PathLike]] = None,
    allow_download: Optional[bool] = None,
) -> Path:
    """The local file or folder for `spec` (see the module docstring for the search order)."""
    folders = reward_model_folders(model_dir)
    repo = spec.hf_repo
    if path is not None and str(path).strip():
        candidate = Path(path).expanduser()
        if candidate.exists():
            return _check_explicit(candidate, spec).resolve()
        if not candidate.is_absolute():
            for folder in folders:
                if (folder / candidate).exists():
                    return _check_explicit(folder / candidate, spec).resolve()
        if _REPO_ID.match(str(path)) and not str(path).startswith((".", "/")):
            repo = str(path)
        else:
            where = "" if candidate.is_absolute() else (
                " (also looked in: " + ", ".join(str(f) for f in folders) + ")" if folders else "")
            raise RewardModelNotFoundError(
                f"{spec.label}: {candidate} does not exist{where}. Expected "
                f"{spec.describe_needs()}.")
    else:
        for folder in folders:
            for name in spec.local_names:
                if _usable(folder / name, spec):
                    return (folder / name).resolve()

    reason = "no Hugging Face repo is known for it"
    if repo:
        found, reason = _from_hf_cache(repo, spec, downloads_allowed(allow_download))
        if found is not None:
            return found
    raise RewardModelNotFoundError(_not_found_message(spec, folders, repo, reason))


def _not_found_message(spec: ModelFiles, folders: Iterable[Path], repo: Optional[str],
                       reason: str) -> str:
    folders = list(folders)
    name = spec.local_names[0]
    what = (f"a folder named '{name}' holding {spec.describe_needs()}" if spec.is_dir
            else f"the file '{name}'")
    source = ""
    if repo:
        source = (f" from https://huggingface.co/{repo}" +
                  (f" (file {spec.hf_filename})" if spec.hf_filename else ""))
    lines = [f"{spec.label} not found. Put {what}{source} in "]
    if folders:
        lines[0] += "one of these folders:"
        lines.extend(f"  - {folder}" for folder in folders)
    else:
        lines[0] += ("ComfyUI's models/reward_models folder, a folder named by the "
                     f"{ENV_MODEL_DIRS} environment variable or passed as model_dir=,")
    if _NAME_IT_YOURSELF.get():
        lines.append(_NAME_IT_YOURSELF.get())
    if repo:
        lines.append(f"Hugging Face repo {repo}: {reason}.")
    return "\n".join(lines)
