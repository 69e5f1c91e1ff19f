"""The Backend over ComfyUI's own MODEL / CLIP / VAE objects.

How the LoRA is attached (ComfyUI's own training machinery, as in comfy_extras/nodes_train.py):
- the user's ModelPatcher is cloned (a deep copy with its own weights, reloaded from the
  checkpoint, where the ComfyUI version and the loader support `clone(force_deepcopy=True)`);
  nothing is ever registered on the original;
- every target projection (to_q/to_k/to_v/to_out.0 of the transformer blocks) gets a
  `comfy.weight_adapter` LoRA as a *weight wrapper*: ComfyUI calls it with the (cast) weight on
  every forward, so the LoRA is live and differentiable, and lowvram/offload, dtype casting and
  LoRAs patched in upstream keep working;
- every other module's weight and bias gets an identity wrapper. Weights loaded by ComfyUI are
  inference tensors; a wrapper makes ComfyUI copy the weight per forward, which is what lets
  autograd save it for backward;
- every wrapper returns a fresh tensor, never one sharing storage with its input: under dynamic
  VRAM and low-VRAM offload the input is a view of a cast buffer that ComfyUI reuses for the
  next layer while autograd still holds what the wrapper returned for backward;
- the adapters share one switch: `adapters_disabled()` turns the LoRA off without re-patching,
  so the base model of the log-ratio is the same patcher.

Model calls go through `comfy.samplers.calc_cond_batch` with the patcher's model options, the
path ComfyUI's samplers take, so model patches (attention patches, model function wrappers,
patcher wrappers) apply.

Inference mode: the user's CLIP and VAE hold inference tensors (ComfyUI loads
checkpoints under inference mode), and ComfyUI moves them to the GPU inside encode/decode with
`Module.to`. Outside inference mode such a move (a real copy on a GPU) leaves Parameters that
fail at the next forward ("Inference tensors do not track version counter"), so the job thread
encodes prompts and decodes latents under `torch.inference_mode()`, as ComfyUI's own nodes do,
and copies the results out as ordinary tensors. The LoRA factors, which ComfyUI may move from
inside those calls, move outside inference mode (SwitchableAdapter.move_to).

Cancel: since ComfyUI 2025-10-13 (after 0.3.64) every op raises InterruptProcessingException when the interrupt
flag is set, in whatever thread runs the model, and clears the flag. Model calls turn it into
`ModelInterrupted` (a `StopRequested`: the trainer drops the partial step, saves a checkpoint and
returns) and set `interrupted`, so the node can end as interrupted.

Two kinds of model sampling are trained, told apart by the model-sampling object's classes
(never its name): discrete VP schedules (EPS / V_PREDICTION: SD1.x, SD2.x, SDXL), sampled with
the DDPM policy, and rectified flow (CONST with a ModelSamplingDiscreteFlow or ModelSamplingFlux
schedule and unit noise_scale: SD3/3.5, Flux, Lumina2/Z-Image, Qwen-Image, Chroma, ...), sampled
with the flow-SDE policy. Anything else (EDM, Cosmos RFlow, X0, a CONST noise_scale other than 1)
is refused with a clear error, and so is HiDream (its encoder's Llama features are not passed).
LoRA key names follow the architecture, never the sampling: a UNet gets kohya keys in diffusers
naming whatever model-sampling node is upstream (lora/comfy_adapter.py).

Conventions (see base.py): latents are in the space the sampler works in (`process_latent_in`,
e.g. x 0.18215 for SD1.x, scale + shift for Flux); `apply_model` returns the denoised x0 for
every model type. VP: ComfyUI's sigma space is x_vp / sqrt(a_t), so eps = (x_sigma - x0) / sigma
(`predict_eps`). Flow: the latent is ComfyUI's x_sigma itself (no input rescaling) and the
backend answers x0 (`prediction = "x0"`); the policy takes v = (x - x0) / sigma. The flow
schedule is ComfyUI's "simple" scheduler on the model's own sigma table (its shift, a
ModelSamplingSD3 / ModelSamplingFlux node upstream included): `flow_sigmas`.

ComfyUI modules are imported inside functions: this module is importable without ComfyUI.
"""
from __future__ import annotations

import collections
import contextlib
import fnmatch
import math
import uuid
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.utils.checkpoint

from ..lora import comfy_adapter as comfy_lora
from ..models import families as model_families
from ..models.inference_tensors import is_inference_like, ordinary
from ..runs.stop_signals import StopRequested
from .base import Backend, Cond, block_modules

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: LoRA targets per transformer architecture (globs on ComfyUI's module names), used when the
#: default UNet targets match nothing: Flux/Chroma (fused qkv, attention out, single-block
#: linear1/linear2), SD3's MMDiT (joint blocks' image and text attention), Lumina2/Z-Image
#: (NextDiT attention). Models with to_q/to_k/to_v/to_out (Qwen-Image, ...) match the default.
ARCHITECTURE_TARGETS = (
    ("double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj", "double_blocks.*.txt_attn.qkv",
     "double_blocks.*.txt_attn.proj", "single_blocks.*.linear1", "single_blocks.*.linear2"),
    ("joint_blocks.*.x_block.attn.qkv", "joint_blocks.*.x_block.attn.proj",
     "joint_blocks.*.context_block.attn.qkv", "joint_blocks.*.context_block.attn.proj"),
    ("layers.*.attention.qkv", "layers.*.attention.out"),
)
PROMPT_CACHE_SIZE = 64


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors live in the same storage (True when it cannot be told)."""
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return True


def fresh(result: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`result`, copied when it shares storage with `source` (a buffer ComfyUI may reuse)."""
    return result.clone() if shares_storage(result, source) else result


def identity_weight(weight: torch.Tensor) -> torch.Tensor:
    """A weight wrapper that changes nothing (its presence makes ComfyUI copy the weight).
    Detached: the base weights never receive gradients, whatever their requires_grad says.
    A copy: the input may be a reused cast buffer (dynamic VRAM, low-VRAM offload)."""
    return weight.detach().clone()


class ModelInterrupted(StopRequested):
    """ComfyUI's Cancel, raised inside a model call: the trainer stops gracefully on it."""


#: flow-matching parameterisations and schedules of comfy.model_sampling (CONST: SD3, Flux, ...)
FLOW_SAMPLING_CLASSES = ("CONST", "COSMOS_RFLOW", "ModelSamplingDiscreteFlow", "ModelSamplingFlux",
                         "ModelSamplingAV", "ModelSamplingCosmosRFlow")
#: the flow schedules the flow-SDE policy samples (a sigma table, 1 -> 0, with CONST: flow_sigmas)
TRAINED_FLOW_SCHEDULES = ("ModelSamplingDiscreteFlow", "ModelSamplingFlux")


def flow_sampling_base(sampling) -> Optional[str]:
    """The name of the flow-matching class `sampling` derives from, or None.

    ComfyUI builds every model-sampling object as a class named `ModelSampling` mixing a
    schedule and a parameterisation, so the test is isinstance, never the class name.
    """
    import comfy.model_sampling

    for name in FLOW_SAMPLING_CLASSES:
        cls = getattr(comfy.model_sampling, name, None)   # not every class exists in every version
        if cls is not None and isinstance(sampling, cls):
            return name
    return None


def sampling_bases(sampling) -> str:
    return " + ".join(c.__name__ for c in type(sampling).__bases__) or type(sampling).__name__


def is_trained_flow(sampling) -> bool:
    """CONST (rectified flow, x0 = x - v sigma) with a 1 -> 0 flow schedule the policy samples."""
    import comfy.model_sampling

    const = getattr(comfy.model_sampling, "CONST", None)
    schedules = tuple(getattr(comfy.model_sampling, n) for n in TRAINED_FLOW_SCHEDULES
                      if hasattr(comfy.model_sampling, n))
    return const is not None and isinstance(sampling, const) and bool(schedules) and \
        isinstance(sampling, schedules) and isinstance(getattr(sampling, "sigmas", None), torch.Tensor)


def sampling_kind(sampling) -> str:
    """"vp" or "flow" for a model sampling PRDP trains, else a one-line ValueError naming it."""
    if flow_sampling_base(sampling) is not None:
        if is_trained_flow(sampling):
            check_unit_noise_scale(sampling)
            return "flow"
        raise ValueError(f"this model's flow sampling ({sampling_bases(sampling)}) is not rectified flow with a "
                         "1 -> 0 schedule (CONST + ModelSamplingDiscreteFlow / ModelSamplingFlux, as SD3, Flux, "
                         "Lumina2, Qwen-Image); PRDP cannot sample it with log-probs")
    import comfy.model_sampling

    discrete = getattr(comfy.model_sampling, "ModelSamplingDiscrete", None)
    if discrete is None or not isinstance(sampling, discrete):
        raise ValueError(f"this model's sampling ({sampling_bases(sampling)}) is neither a discrete DDPM schedule "
                         "(eps / v-prediction: SD1.x/SD2.x/SDXL) nor rectified flow (SD3, Flux, ...); PRDP cannot "
                         "sample it with log-probs (a continuous EDM / v model-sampling node upstream?)")
    vp_sigmas(sampling)
    return "vp"


def check_unit_noise_scale(sampling) -> None:
    """ComfyUI's CONST sampling may scale the noise (`noise_scale`: x_sigma = sigma s noise +
    (1 - sigma) x0, and its samplers' SDE noise; HiDream-O1 sets 8): the flow policy starts from
    and steps with unit noise, so any other scale is refused in one line."""
    scale = getattr(sampling, "noise_scale", 1.0)
    if float(scale) != 1.0:
        raise ValueError(f"this model's flow sampling has noise_scale {float(scale):g} (HiDream-O1 sets 8), "
                         "which scales its starting noise; PRDP's flow policy samples from unit noise and "
                         "trains only models with noise_scale 1")


def flow_sigmas(sampling, steps: int) -> torch.Tensor:
    """float64 [steps + 1]: the schedule KSampler samples with scheduler "simple" (ComfyUI's
    flow-model default), so training sees the images users compare with ComfyUI's samplers.

    ComfyUI keeps the model's shifted schedule (its shift, or a ModelSamplingSD3 / Flux node's)
    as a table of sigmas at t = 1/n ... n/n; "simple" takes `steps` entries from its top down,
    entry n - 1 - floor(i * (n / steps)) for step i (the product in floating point, as ComfyUI
    takes it), then 0. That equals percent_to_sigma(i / steps) only where `steps` divides n (SD3
    at 12, 16 or 28 steps differs by 1-2e-3). Values are the table's (float32) in float64."""
    if not is_trained_flow(sampling):
        raise ValueError(f"this model's sampling ({sampling_bases(sampling)}) is not a rectified-flow schedule")
    with torch.inference_mode(False):
        table = sampling.sigmas.detach().to("cpu", torch.float32).clone()
    spacing = len(table) / steps
    picks = [float(table[len(table) - 1 - int(step * spacing)]) for step in range(steps)]
    return torch.tensor(picks + [0.0], dtype=torch.float64)


#: ComfyUI model classes (comfy.model_base) PRDP does not train: HiDream's encoder always adds
#: Llama features (`conditioning_llama3`) that are not passed to the model here
UNSUPPORTED_ARCHITECTURES = ("HiDream", "HiDreamO1")


def refuse_unsupported_architecture(base_model) -> None:
    """A one-line ValueError for a model PRDP cannot train (UNSUPPORTED_ARCHITECTURES), before any work."""
    import comfy.model_base

    for name in UNSUPPORTED_ARCHITECTURES:
        cls = getattr(comfy.model_base, name, None)      # not every class exists in every version
        if cls is not None and isinstance(base_model, cls):
            raise ValueError(f"HiDream is not supported by PRDP (this MODEL is ComfyUI's {name}): its text "
                             "encoder's Llama features are not passed to the model; train SD1.x/SDXL, SD3/3.5, "
                             "Flux, Chroma, Lumina2/Z-Image or Qwen-Image instead")


def vp_sigmas(sampling) -> torch.Tensor:
    """The discrete sigma schedule of an eps / v-prediction model sampling (CPU float32), or a
    ValueError for flow models and anything else that is not a discrete DDPM schedule."""
    bases = sampling_bases(sampling)
    if flow_sampling_base(sampling) is not None:
        raise ValueError(f"this model samples with flow matching ({bases}: SD3, Flux, Qwen-Image, ...), which has "
                         "no discrete DDPM schedule; it is trained with the flow_sde policy (flow_sigmas)")
    sigmas = getattr(sampling, "sigmas", None)
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or len(sigmas) < 2:
        raise ValueError(f"this model's sampling ({bases}) is not a discrete "
                         "DDPM schedule; PRDP training supports SD1.x/SD2.x/SDXL-style UNet models and rectified-flow "
                         "models (SD3, Flux, Lumina2, Qwen-Image, ...)")
    with torch.inference_mode(False):
        return sigmas.detach().to("cpu", torch.float32).clone()


#: a deep copy is made only while host RAM keeps this multiple of the model's size free
DEEP_COPY_RAM_FACTOR = 2.0


def deep_copy_fits(model) -> bool:
    """Whether host RAM has room for a second copy of the model's weights (with headroom): a
    deep copy reloads the checkpoint beside the user's model (Flux bf16: +24 GB)."""
    import comfy.model_management

    free = comfy.model_management.get_free_memory(torch.device("cpu"))
    return free >= DEEP_COPY_RAM_FACTOR * model.model_size()


def training_clone(model):
    """A clone of the user's ModelPatcher to train on: a deep copy with its own (non-inference)
    weights where this ComfyUI and the model's loader support it and host RAM has room for it,
    as ComfyUI's own trainer clones; else an ordinary clone sharing the weights (inference
    tensors are never written: the wrappers copy them per forward, and every wrapper and
    forward patch is removed from the shared modules on release)."""
    import inspect
    import logging

    with torch.inference_mode(False):
        if "force_deepcopy" in inspect.signature(model.clone).parameters and \
                getattr(model, "cached_patcher_init", None) is not None:
            if deep_copy_fits(model):
                return model.clone(force_deepcopy=True)
            logging.getLogger(__name__).info(
                "PRDP: training on the loaded model's weights (no deep copy: host RAM has no room for a second "
                "copy of %.1f GB)", model.model_size() / 2 ** 30)
        return model.clone()


class AdapterSwitch:
    """Shared on/off state of all adapters of one backend."""

    def __init__(self) -> None:
        self.enabled = True


class SwitchableAdapter(torch.nn.Module):
    """A `comfy.weight_adapter` training adapter behind an on/off switch.

    ComfyUI calls it as `adapter(weight)` on every forward; `move_to` lets ComfyUI move the
    factors with the model (lowvram, offload).
    """

    def __init__(self, adapter: torch.nn.Module, switch: AdapterSwitch):
        super().__init__()
        self.adapter = adapter
        self.switch = switch

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        weight = weight.detach()     # gradients go to the LoRA factors only
        return fresh(self.adapter(weight) if self.switch.enabled else weight, weight)

    def move_to(self, device=None) -> int:
        """ComfyUI moves the factors with the model, sometimes from code running under
        inference mode (encoding, decoding): the move runs outside it, so the trained factors
        never become inference tensors (which the optimizer could not update)."""
        if device is not None:
            with torch.inference_mode(False):
                self.to(device)
        return self.passive_memory_usage()

    def passive_memory_usage(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


class ForwardPatches:
    """Instance-level `forward` replacements on modules that may be shared with the user's
    MODEL; `remove()` restores exactly what each module had before (its own `forward`
    attribute, or none)."""

    _MISSING = object()

    def __init__(self):
        self._patched: List[tuple] = []

    def _replace_forward(self, module: torch.nn.Module, forward) -> None:
        self._patched.append((module, module.__dict__.get("forward", self._MISSING)))
        module.forward = forward

    def remove(self) -> None:
        for module, previous in reversed(self._patched):
            if previous is self._MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._patched.clear()


class BlockCheckpointing(ForwardPatches):
    """Activation checkpointing of the UNet's blocks (each layer of input_blocks, middle_block,
    output_blocks): activations are recomputed in backward instead of kept, for memory.

    The UNet may be shared with the user's MODEL, so the patch is an instance-level `forward`
    that checkpoints only while `enabled` and gradients are on, and `remove()` restores
    exactly what was there before. `guard` wraps the recomputation in backward (which runs
    the model's ops again, so it may meet ComfyUI's interrupt).
    """

    #: block lists of transformer diffusion models (Flux/Chroma, SD3, Lumina2, Qwen-Image, ...)
    TRANSFORMER_BLOCK_LISTS = ("double_blocks", "single_blocks", "joint_blocks", "layers", "transformer_blocks")

    def __init__(self, unet: torch.nn.Module, guard=contextlib.nullcontext):
        super().__init__()
        self.enabled = True
        self.guard = guard
        blocks = list(getattr(unet, "input_blocks", [])) + [getattr(unet, "middle_block", None)] + \
            list(getattr(unet, "output_blocks", []))
        for block in blocks:
            if block is None:
                continue
            for layer in block.children():
                self._patch(layer)
        for name in self.TRANSFORMER_BLOCK_LISTS:       # flow transformers: each block
            for layer in getattr(unet, name, None) or []:
                self._patch(layer, private_inputs=True)

    def _patch(self, layer: torch.nn.Module, private_inputs: bool = False) -> None:
        """private_inputs (transformer blocks): the block gets its own copies of its tensor
        inputs and a snapshot of dict options (transformer_options), because such blocks add
        residuals into their inputs in place (Flux: `txt += ...`) and ComfyUI updates the
        options dict between blocks; the recomputation in backward must see what forward saw."""
        original = layer.forward
        gate = self
        own = (lambda v: v.clone() if isinstance(v, torch.Tensor) else v)

        def guarded(*args, **kwargs):
            with gate.guard():
                if private_inputs:
                    args, kwargs = [own(a) for a in args], {k: own(v) for k, v in kwargs.items()}
                return original(*args, **kwargs)

        def forward(*args, **kwargs):
            if gate.enabled and torch.is_grad_enabled():
                if private_inputs:
                    kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
                return torch.utils.checkpoint.checkpoint(guarded, *args, use_reentrant=False, **kwargs)
            return original(*args, **kwargs)

        self._replace_forward(layer, forward)


@contextlib.contextmanager
def comfy_training_mode() -> Iterator[None]:
    """ComfyUI's `model_management.in_training` switched on (where this ComfyUI has it): models
    then use ops with autograd formulas (e.g. Flux's rope without the comfy_kitchen kernel).
    On for every model call of the backend, sampling included, so recorded and re-evaluated
    log-probs come from the same ops; restored afterwards."""
    import comfy.model_management

    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    previous = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = previous


def saved_tensor_copies():
    """While active, autograd keeps copies of the tensors it saves for backward.

    Flow transformers add residuals in place (Flux's blocks: `txt += ...`, `x += ...`) onto
    tensors autograd already saved, which makes backward fail ("modified by an inplace
    operation"); a copy taken when saved is what the forward saw. Costs one copy of the saved
    activations (and weight copies) per forward with gradients on; sampling is not affected.
    """
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)


class InferenceParameterCopies(ForwardPatches):
    """Modules outside ComfyUI's ops (no weight_function, e.g. Flux's RMSNorm `scale`) read
    their parameters directly, and ComfyUI's weights may be inference tensors: loaded under
    inference mode, or given inference data when ComfyUI moves (evicts) the model from inside
    inference mode (the job's text encoding and decoding run there). Autograd cannot save those
    for backward (and a Parameter made in inference mode whose data a move outside it swapped
    has no version counter: inference_tensors.is_inference_like), so while gradients are on, such
    a module's forward runs on normal copies of whichever of its parameters are inference-like
    at that call (detached: never trained);
    `remove()` restores what was there. The patch is an instance-level `forward`
    (ForwardPatches) on every such module that holds parameters."""

    def __init__(self, root: torch.nn.Module):
        super().__init__()
        for module in root.modules():
            if hasattr(module, "weight_function"):
                continue       # ComfyUI ops: the weight wrappers copy these
            if any(p is not None for p in module._parameters.values()):
                self._patch(module)

    def _patch(self, module: torch.nn.Module) -> None:
        original = module.forward

        def forward(*args, **kwargs):
            if not torch.is_grad_enabled():
                return original(*args, **kwargs)
            saved = {name: p for name, p in module._parameters.items() if p is not None and is_inference_like(p)}
            if not saved:
                return original(*args, **kwargs)
            try:
                with torch.inference_mode(False):
                    for name, value in saved.items():
                        module._parameters[name] = torch.nn.Parameter(ordinary(value), requires_grad=False)
                return original(*args, **kwargs)
            finally:
                module._parameters.update(saved)

        self._replace_forward(module, forward)


def training_compute_dtype(mixed_precision: Optional[str], device_type: str,
                           bf16_supported: bool) -> Optional[torch.dtype]:
    """The UNet compute dtype while training, or None to keep ComfyUI's choice.

    Only GPUs change: 'no' -> fp32; 'bf16' or 'fp16' -> bf16 where the GPU has it (its range
    needs no loss scaling), else fp16, which the trainer then trains with dynamic loss scaling
    (ComfyBackend.compute_dtype). On the CPU (or MPS) ComfyUI's choice stays.
    """
    if device_type != "cuda" or mixed_precision is None:
        return None
    if mixed_precision == "no":
        return torch.float32
    if mixed_precision in ("bf16", "fp16"):
        return torch.bfloat16 if bf16_supported else torch.float16
    raise ValueError(f"mixed_precision={mixed_precision!r}: use 'no', 'fp16' or 'bf16'")


#: the training reserve for a first update phase, in units of ComfyUI's inference estimate
#: (activations kept for backward, the LoRA-merged weights of a block, gradients)
TRAINING_RESERVE_FACTOR = 3
#: what the reward phase asks ComfyUI to free, in units of the reward's weights (its activations
#: at the reward batch size on top)
REWARD_MEMORY_HEADROOM = 1.5
#: headroom over the measured peak of earlier update phases (allocator rounding, batch variation)
MEASURED_RESERVE_HEADROOM = 1.25


def training_reserve(inference_estimate: int, measured_peak: int) -> int:
    """Bytes ComfyUI keeps free beside the model while it trains: a multiple of its inference
    estimate until an update phase was measured, then at least that measured peak with headroom
    (ComfyUI's estimate is of inference: for Flux at 512 px 3x of it is ~0.7 GB, while backward
    is expected to need 2-3 GB; an estimate from reading the code, not measured on a GPU here)."""
    return max(TRAINING_RESERVE_FACTOR * int(inference_estimate), int(MEASURED_RESERVE_HEADROOM * measured_peak))


def is_target_module(name: str, targets: Sequence[str]) -> bool:
    """Whether module `name` (ComfyUI's, relative to diffusion_model) is a LoRA target: a glob
    target (with `*`, e.g. `double_blocks.*.img_attn.qkv`) matches the whole name; a plain one
    (`to_q`) is a name suffix inside transformer blocks, e.g. `...transformer_blocks.0.attn1.to_q`."""
    for target in targets:
        if "*" in target or "?" in target:
            if fnmatch.fnmatchcase(name, target):
                return True
        elif ".transformer_blocks." in f".{name}" and name.endswith("." + target):
            return True
    return False


def resolve_targets(module_names: Sequence[str], targets: Sequence[str]) -> tuple:
    """The targets to use: `targets` as given, except that the default UNet targets on a model
    without such modules become its architecture's targets (ARCHITECTURE_TARGETS)."""
    targets = tuple(targets)
    if targets != DEFAULT_TARGETS or any(is_target_module(n, targets) for n in module_names):
        return targets
    for candidates in ARCHITECTURE_TARGETS:
        if any(is_target_module(n, candidates) for n in module_names):
            return candidates
    return targets


def repeat_to_length(context: torch.Tensor, length: int) -> torch.Tensor:
    """[n, L, ...] -> [n, length, ...] by repeating whole token blocks (ComfyUI batches
    conditionings of different lengths this way; cross-attention is unchanged by it)."""
    if context.shape[1] == length:
        return context
    if length % context.shape[1]:
        raise ValueError(f"cannot repeat a conditioning of length {context.shape[1]} to {length}")
    return context.repeat(1, length // context.shape[1], *([1] * (context.dim() - 2)))


#: conditioning extras of ComfyUI's text encoders passed to the model per row, sliced with the
#: context to each row's true token count ([1, tokens] masks: Qwen-Image, Lumina2/Z-Image, Chroma, ...)
TOKEN_EXTRAS = ("attention_mask",)


def row_groups(cond: Cond) -> List[List[int]]:
    """Rows of `cond` that one model call may evaluate together, exactly as each alone: the
    same true token count ("context_tokens") and the same token extras (an attention mask
    is one per call: Lumina2 reads its sum as num_tokens)."""
    tokens = cond["context_tokens"].tolist()
    groups: "collections.OrderedDict[tuple, List[int]]" = collections.OrderedDict()
    for row, count in enumerate(tokens):
        key = (count,) + tuple(tuple(cond[k][row, :count].flatten().tolist()) for k in TOKEN_EXTRAS if k in cond)
        groups.setdefault(key, []).append(row)
    return list(groups.values())


class ComfyBackend(Backend):
    """Backend over a ComfyUI MODEL (ModelPatcher), CLIP and VAE.

    Build it with inference mode off (the node does `torch.inference_mode(False)`), so the
    LoRA factors are ordinary trainable tensors.
    """

    def __init__(self, model, clip, vae, *, rank: int = 8, alpha: Optional[float] = None,
                 targets: Sequence[str] = DEFAULT_TARGETS, seed: int = 0,
                 model_name: Optional[str] = None, gradient_checkpointing: bool = False,
                 mixed_precision: Optional[str] = None, guidance: Optional[float] = None):
        import comfy.model_management
        import comfy.weight_adapter

        if model is None or not hasattr(model, "clone") or not hasattr(model, "model"):
            raise ValueError("model: expected a ComfyUI MODEL (connect the MODEL output of Load Checkpoint)")
        refuse_unsupported_architecture(model.model)
        if clip is None:
            raise ValueError("clip is None: the checkpoint has no text encoder; load one with a CLIP loader")
        if vae is None:
            raise ValueError("vae is None: the checkpoint has no VAE; load one with Load VAE")
        if rank < 1:
            raise ValueError(f"lora_rank={rank}: must be at least 1")
        if guidance is not None and not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance >= 0):
            raise ValueError(f"guidance={guidance}: must be a finite number >= 0 (Flux.1-dev: 3.5, as FluxGuidance)")
        self.source_model = model
        self.clip = clip
        self.vae = vae
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.targets = tuple(targets)
        sampling = model.get_model_object("model_sampling")
        self.sampling_kind = sampling_kind(sampling)          # before any expensive work
        self._model_sampling = sampling
        if self.sampling_kind == "flow":
            self.prediction = "x0"                            # apply_model's denoised output
            self._sigmas = None
        else:
            self._sigmas = vp_sigmas(sampling)
        #: Flux-style guidance-distilled models take the guidance value as conditioning (cfg 1);
        #: None keeps ComfyUI's default (3.5 for Flux, as without a FluxGuidance node)
        self.guidance = None if guidance is None else float(guidance)
        self.interrupted = False
        self.patcher = training_clone(model)
        base = self.patcher.model
        self.model_name = model_name or type(base.model_config).__name__
        self.device = self.patcher.load_device
        self.dtype = torch.float32   # inputs; ComfyUI casts to the model's compute dtype itself
        compute = training_compute_dtype(
            mixed_precision, self.device.type,
            self.device.type == "cuda" and comfy.model_management.should_use_bf16(self.device))
        if compute is not None:
            self.patcher.set_model_compute_dtype(compute)
        #: what the model computes in (float16 turns on the trainer's loss scaling)
        self.compute_dtype = compute or getattr(base, "manual_cast_dtype", None) or base.get_dtype()
        self._alphas = None if self._sigmas is None else 1.0 / (1.0 + self._sigmas.double() ** 2)
        self._needs_pooled = bool(getattr(base, "adm_channels", 0))
        #: flow transformers (SD3, Flux) read the pooled text vector when the CLIP gives one
        self._pass_pooled = self._needs_pooled or self.sampling_kind == "flow"
        self._prompt_cache: "collections.OrderedDict[str, Dict[str, torch.Tensor]]" = collections.OrderedDict()
        self._model_options = None
        self.switch = AdapterSwitch()
        self.adapters: Dict[str, SwitchableAdapter] = {}
        self._wrappers: List[object] = []
        self._loaded_batch = 0
        self._training_baseline: Optional[int] = None   # CUDA bytes allocated when the update phase began
        self._training_peak = 0                          # the largest update-phase peak above it so far
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self._checkpointing: Optional[BlockCheckpointing] = None

        self.targets = resolve_targets([n for n, _ in base.diffusion_model.named_modules()], self.targets)
        with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name, module in base.diffusion_model.named_modules():
                if not hasattr(module, "weight_function"):
                    continue  # not a ComfyUI op (containers, model_sampling)
                key = f"diffusion_model.{name}"
                weight = getattr(module, "weight", None)
                if weight is not None:
                    if is_target_module(name, self.targets) and weight.dim() == 2:
                        lora = comfy.weight_adapter.LoRAAdapter.create_train(weight, self.rank, self.alpha)
                        wrapper = SwitchableAdapter(lora, self.switch)
                        wrapper.requires_grad_(True)
                        lora.alpha.requires_grad_(False)
                        self.adapters[name] = wrapper
                    else:
                        wrapper = identity_weight
                    self.patcher.add_weight_wrapper(f"{key}.weight", wrapper)
                    self._wrappers.append(wrapper)
                if getattr(module, "bias", None) is not None:
                    self.patcher.add_weight_wrapper(f"{key}.bias", identity_weight)
        self._parameter_copies = InferenceParameterCopies(base.diffusion_model)
        if not self.adapters:
            self.release()     # the identity wrappers may sit on modules shared with the user's model
            raise ValueError(f"no module of this model matches the LoRA targets {list(self.targets)}; name "
                             "modules of its diffusion model (e.g. to_q, or a glob like double_blocks.*.img_attn.qkv)")
        self._ldm_to_diffusers = comfy_lora.kohya_names_for(base)

    # --- schedule ----------------------------------------------------------------------
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        if self._alphas is None:
            raise ValueError("a flow-matching model has no VP schedule (alphas_cumprod); sample it with the "
                             "flow_sde policy")
        return self._alphas

    def flow_sigmas(self, steps: int) -> torch.Tensor:
        return flow_sigmas(self._model_sampling, steps)

    def latent_shape(self, height: int, width: int) -> Sequence[int]:
        channels = self.patcher.model.latent_format.latent_channels
        ratio = getattr(self.vae, "downscale_ratio", 8)
        ratio = ratio if isinstance(ratio, int) else 8   # video VAEs give a formula here
        if height % ratio or width % ratio:
            raise ValueError(f"{width}x{height}: width and height must be multiples of {ratio}")
        if getattr(self.patcher.model.latent_format, "latent_dimensions", 2) == 3:
            return (channels, 1, height // ratio, width // ratio)     # video-VAE models (Qwen-Image): one frame
        return (channels, height // ratio, width // ratio)

    # --- model management --------------------------------------------------------------
    def _load(self, batch_shape: Optional[Sequence[int]] = None) -> None:
        """Load the clone the way ComfyUI's samplers do and make it the current patcher."""
        import comfy.model_management
        import comfy.model_patcher
        import comfy.sampler_helpers

        if self._model_options is None:
            options = comfy.model_patcher.create_model_options_clone(self.patcher.model_options)
            comfy.sampler_helpers.prepare_model_patcher(self.patcher, {}, options)
            self._model_options = options
        memory = 0
        if batch_shape is not None:
            estimate = self.patcher.memory_required(list(batch_shape))
            memory = training_reserve(estimate, self._training_peak) if torch.is_grad_enabled() else estimate
        comfy.model_management.load_models_gpu([self.patcher], memory_required=memory)
        self.patcher.pre_run()
        self._loaded_batch = batch_shape[0] if batch_shape is not None else 0

    def _is_loaded(self, batch: int) -> bool:
        import comfy.model_management

        return (self.patcher.model.current_patcher is self.patcher
                and any(m is self.patcher for m in comfy.model_management.loaded_models())
                and batch <= self._loaded_batch)

    def prepare_for_sampling(self) -> None:
        self._end_training_measurement()
        self._load()

    def prepare_for_training(self) -> None:
        self._load()
        self._start_training_measurement()
        if self.gradient_checkpointing and self._checkpointing is None:
            self._checkpointing = BlockCheckpointing(self.patcher.model.diffusion_model, self._model_call)

    def prepare_for_scoring(self, reward_bytes: int) -> None:
        """The reward model goes onto the GPU outside ComfyUI's accounting: ComfyUI first frees
        that much (with headroom for the reward's activations), unloading models as it needs to,
        the training model included (it is loaded again for the next sampling phase)."""
        import comfy.model_management

        if reward_bytes > 0 and self.device.type == "cuda":
            comfy.model_management.free_memory(int(REWARD_MEMORY_HEADROOM * reward_bytes), self.device)

    def release(self) -> None:
        """Unload the clone and take this backend's wrappers off the shared modules."""
        import comfy.model_management

        if self._checkpointing is not None:
            self._checkpointing.remove()
            self._checkpointing = None
        if getattr(self, "_parameter_copies", None) is not None:
            self._parameter_copies.remove()
            self._parameter_copies = None
        for loaded in list(comfy.model_management.current_loaded_models):
            if loaded.model is self.patcher:
                loaded.model_unload()
                comfy.model_management.current_loaded_models.remove(loaded)
        ours = set(id(w) for w in self._wrappers) | {id(identity_weight)}
        for module in self.patcher.model.diffusion_model.modules():
            for attr in ("weight_function", "bias_function"):
                functions = getattr(module, attr, None)
                if functions:
                    setattr(module, attr, [f for f in functions if id(f) not in ours])
        if getattr(self.patcher.model, "current_patcher", None) is self.patcher:
            self.patcher.model.current_patcher = None

    def _start_training_measurement(self) -> None:
        """On CUDA: the update phase's peak memory above what is allocated now is measured."""
        if self.device.type == "cuda":
            self._training_baseline = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _end_training_measurement(self) -> None:
        """The last update phase's measured peak above its start (activations, merged weights,
        gradients, optimizer state) becomes the floor of the next training reserve."""
        if self._training_baseline is None:
            return
        peak = torch.cuda.max_memory_allocated(self.device) - self._training_baseline
        self._training_peak = max(self._training_peak, int(peak))
        self._training_baseline = None

    def stop_check_modules(self) -> List[torch.nn.Module]:
        return block_modules(self.patcher.model.diffusion_model)

    # --- model verbs -------------------------------------------------------------------
    @contextlib.contextmanager
    def interrupts_as_stop(self) -> Iterator[None]:
        """ComfyUI's interrupt raised by a model call -> ModelInterrupted, and `interrupted` set."""
        import comfy.model_management

        try:
            yield
        except comfy.model_management.InterruptProcessingException as interrupt:
            self.interrupted = True
            raise ModelInterrupted("Cancel pressed in ComfyUI") from interrupt

    @contextlib.contextmanager
    def _model_call(self) -> Iterator[None]:
        """Around every diffusion-model computation (forward, and recomputation in backward)."""
        with self.interrupts_as_stop(), comfy_training_mode():
            yield

    def encode_prompts(self, prompts: List[str]) -> Cond:
        with self.interrupts_as_stop():
            rows = [self._encode_one(p) for p in prompts]
        length = math.lcm(*[row["context"].shape[1] for row in rows])
        cond = {"context": torch.cat([repeat_to_length(r["context"], length) for r in rows]),
                # each row's true token count: joint-attention models are evaluated at it (denoise)
                "context_tokens": torch.tensor([r["context"].shape[1] for r in rows], dtype=torch.int64)}
        if all("pooled_output" in r for r in rows):
            cond["pooled_output"] = torch.cat([r["pooled_output"] for r in rows])
        for key in TOKEN_EXTRAS:
            present = [key in r for r in rows]
            if any(present) and not all(present):
                raise ValueError(f"the text encoder gave a '{key}' for some prompts and not for others; "
                                 "use one CLIP for all prompts")
            if all(present):
                cond[key] = torch.cat([repeat_to_length(r[key], length) for r in rows])
        return {key: value.to(self.device) for key, value in cond.items()}

    def _encode_one(self, prompt: str) -> Dict[str, torch.Tensor]:
        cached = self._prompt_cache.get(prompt)
        if cached is not None:
            self._prompt_cache.move_to_end(prompt)
            return cached
        with torch.inference_mode():    # as CLIPTextEncode does (module docstring: Inference mode)
            schedule = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(prompt))
        context, extras = schedule[0]
        row = {"context": ordinary(context.float().cpu())}
        pooled = extras.get("pooled_output")
        if self._needs_pooled and pooled is None:
            raise ValueError("this model needs the text encoder's pooled output, which the CLIP did not give")
        if self._pass_pooled and pooled is not None:
            row["pooled_output"] = ordinary(pooled.float().cpu()).reshape(1, -1)
        row.update(self._token_extras(extras, context))
        self._prompt_cache[prompt] = row
        while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return row

    def _token_extras(self, extras: dict, context: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The conditioning extras passed to the model per row (TOKEN_EXTRAS); any other extra
        the encoder gives would be dropped, so the model would be trained on a conditioning
        KSampler does not use: refused in one line, before any model work."""
        row = {}
        for key, value in extras.items():
            if key == "pooled_output" or not isinstance(value, torch.Tensor):
                continue      # scheduling entries (clip_start_percent, hooks): not model inputs
            if key not in TOKEN_EXTRAS:
                raise ValueError(f"the text encoder of this {self.model_name} model gives a '{key}' conditioning "
                                 "extra, which PRDP does not pass to the model; train with a CLIP whose "
                                 "conditioning has only pooled_output / attention_mask extras")
            if value.dim() != 2 or value.shape[0] != 1 or value.shape[1] != context.shape[1]:
                raise ValueError(f"the text encoder's '{key}' extra of shape {tuple(value.shape)} "
                                 f"is not one mask over the {context.shape[1]} text tokens of {self.model_name}")
            row[key] = ordinary(value.cpu())
        return row

    def denoise(self, x_sigma: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """ComfyUI's denoised x0 for x in sigma space, through calc_cond_batch.

        Flow transformers (and any model given token extras) attend jointly over text and
        image tokens, so a context repeated to a common length changes their output: rows are
        evaluated in groups of one true token count (row_groups), context and masks sliced
        to it, each row as the model gives it alone. UNets attend to the text by
        cross-attention, where repeating whole token blocks leaves softmax attention
        unchanged (ComfyUI batches this way too): one call on the repeated context, faster."""
        if not self._is_loaded(x_sigma.shape[0]):
            self._load(tuple(x_sigma.shape))
        joint = self.sampling_kind == "flow" or any(k in cond for k in TOKEN_EXTRAS)
        copies = saved_tensor_copies() if self.sampling_kind == "flow" and torch.is_grad_enabled() \
            else contextlib.nullcontext()
        with self._model_call(), copies:
            if not joint or "context_tokens" not in cond:
                return self._denoise_rows(x_sigma, sigma, cond, None)
            groups = row_groups(cond)
            if len(groups) == 1 and int(cond["context_tokens"][0]) == cond["context"].shape[1]:
                return self._denoise_rows(x_sigma, sigma, cond, None)
            outputs, order = [], []
            for rows in groups:
                outputs.append(self._denoise_rows(x_sigma, sigma, cond, rows))
                order += rows
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            return torch.cat(outputs)[inverse.to(outputs[0].device)]

    def _denoise_rows(self, x_sigma: torch.Tensor, sigma: torch.Tensor, cond: Cond,
                      rows: Optional[List[int]]) -> torch.Tensor:
        """One calc_cond_batch call on `rows` (all rows when None), the context and token
        extras sliced to the rows' common true token count (one mask row: ComfyUI repeats it)."""
        import comfy.samplers

        device = x_sigma.device
        context = cond["context"].to(device)
        if rows is not None:
            index = torch.tensor(rows, device=device)
            tokens = int(cond["context_tokens"][rows[0]])
            x_sigma, sigma, context = x_sigma[index], sigma[index], context[index, :tokens]
        # pooled_output is always in the entry, None where the CLIP gives none (Chroma's T5), as
        # in ComfyUI's conditioning: some models' encode_adm index it (Chroma on 0.3.64)
        entry = {"cross_attn": context, "model_conds": {}, "uuid": uuid.uuid4(), "pooled_output": None}
        if "pooled_output" in cond:
            pooled = cond["pooled_output"].to(device)
            entry["pooled_output"] = pooled if rows is None else pooled[index]
        for key in TOKEN_EXTRAS:
            if key in cond:
                value = cond[key].to(device)
                first = 0 if rows is None else rows[0]        # the rows share it (row_groups)
                entry[key] = value[first:first + 1, :value.shape[1] if rows is None else tokens]
        if self.guidance is not None:
            entry["guidance"] = self.guidance              # as FluxGuidance writes it
        base = self.patcher.model
        conds = comfy.samplers.encode_model_conds(base.extra_conds, [entry], x_sigma, device, "positive")
        return comfy.samplers.calc_cond_batch(base, [conds], x_sigma, sigma, self._model_options)[0]

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """VP: the noise prediction at integer timesteps t; flow: the denoised x0 at sigmas t
        (the latent is ComfyUI's x_sigma itself: no input rescaling)."""
        if self.sampling_kind != "flow":
            return self.predict_eps(x, t, cond)
        return self.denoise(x.float(), t.to(x.device, torch.float32), cond)

    def predict_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        if self._sigmas is None:
            raise ValueError("a flow-matching model has no VP noise prediction; use predict (x0)")
        sigma = self._sigmas[t.long().cpu()].to(x.device)
        scale = (1.0 + sigma ** 2).sqrt().view(-1, *([1] * (x.dim() - 1)))
        x_sigma = x.float() * scale                       # = x_vp / sqrt(a_t)
        x0 = self.denoise(x_sigma, sigma, cond).float()
        return (x_sigma - x0) / sigma.view_as(scale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self.interrupts_as_stop(), torch.inference_mode():   # as VAEDecode does (module docstring: Inference mode)
            raw = self.patcher.model.process_latent_out(latents.detach().float())
            images = self.vae.decode(raw)
            if images.dim() == 5:          # video VAEs: [n, frames, H, W, C]
                images = images[:, 0]
            images = images[..., :3].float().cpu().clamp(0, 1)
        return ordinary(images)

    # --- the LoRA ----------------------------------------------------------------------
    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        params = []
        for wrapper in self.adapters.values():
            params += [wrapper.adapter.lora_up.weight, wrapper.adapter.lora_down.weight]
        return params

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        previous = self.switch.enabled
        self.switch.enabled = False
        try:
            yield
        finally:
            self.switch.enabled = previous

    def factors(self) -> Dict[str, comfy_lora.LoraFactors]:
        return {name: comfy_lora.LoraFactors(w.adapter.lora_down.weight, w.adapter.lora_up.weight,
                                             float(w.adapter.alpha))
                for name, w in self.adapters.items()}

    def lora_state_dict(self) -> Dict[str, torch.Tensor]:
        return comfy_lora.to_kohya(self.factors(), self._ldm_to_diffusers)

    def lora_model(self) -> Dict[str, torch.Tensor]:
        """The LoRA as ComfyUI's LORA_MODEL dict."""
        return comfy_lora.to_lora_model(self.factors())

    def load_lora_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        factors = comfy_lora.from_state_dict(state, self.adapters, self._ldm_to_diffusers)
        missing = sorted(set(self.adapters) - set(factors))
        if missing:
            raise ValueError(f"the LoRA has no weights for {len(missing)} trained module(s), e.g. {missing[0]}; "
                             "resume with a checkpoint of the same model and LoRA targets")
        with torch.inference_mode(False), torch.no_grad():
            for name, f in factors.items():
                adapter = self.adapters[name].adapter
                if tuple(f.down.shape) != tuple(adapter.lora_down.weight.shape) or \
                        tuple(f.up.shape) != tuple(adapter.lora_up.weight.shape):
                    raise ValueError(f"LoRA shapes for {name} ({tuple(f.down.shape)}, {tuple(f.up.shape)}) do not "
                                     f"match this run (rank {self.rank}); use the checkpoint's lora_rank")
                adapter.lora_down.weight.copy_(f.down)
                adapter.lora_up.weight.copy_(f.up)
                adapter.alpha.fill_(f.alpha)

    def lora_info(self) -> Dict[str, object]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
                "modules": len(self.adapters), "base_model": self.model_name,
                "family": model_families.comfy_model_family(self.source_model)}
