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

ComfyUI modules are imported inside functions: this package is importable without ComfyUI.
"""
