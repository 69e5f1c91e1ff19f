"""Training configuration: one dataclass, the presets as data, and validation.

Paper rows follow Table 4 of Deng et al. (2024). The paper finetunes the full UNet; with a
LoRA a larger learning rate is usually needed (DDPO's LoRA default is 3e-4), so every value
here is only a starting point and can be overridden.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple


@dataclass
class TrainConfig:
    # the online loop (Algorithm 1)
    epochs: int = 10                    # E
    prompts_per_epoch: int = 4          # N
    images_per_prompt: int = 4          # B (>= 2: pairs are formed within a prompt)
    updates_per_epoch: int = 1          # K
    minibatch_prompts: Optional[int] = None  # prompts per optimizer step (None: all N)
    # sampler
    steps: int = 20                     # T
    cfg: float = 5.0
    eta: float = 1.0                    # 1.0 = DDPM; must be > 0 for log-probs to exist
    width: int = 512
    height: int = 512
    negative_prompt: str = ""
    logprob_reduce: str = "mean"        # [choice] mean (DDPO convention) or sum over latent elements
    # policy (policies/): "auto" = ddpm for eps / v-prediction models, flow_sde for flow models
    policy: str = "auto"
    flow_noise_level: float = 0.7       # flow_sde: Flow-GRPO's a (noise level of the SDE)
    flow_sde_variant: str = "sde"       # flow_sde: "sde" (Flow-GRPO) or "cps" (coefficients-preserving)
    # [first, stop) steps that are stochastic and trained (MixGRPO's SDE window), the rest
    # deterministic (flow: ODE, ddpm: DDIM eta 0); None = every step (flow: all but the last).
    # A window is an APPROXIMATION of the trajectory objective
    sde_window: Optional[List[int]] = None
    # guidance-distilled models (Flux.1-dev): the guidance value given as conditioning, as the
    # FluxGuidance node writes it (train them with cfg 1); None = ComfyUI's default (3.5 for Flux)
    flow_guidance: Optional[float] = None
    # objective
    algorithm: str = "prdp"             # "prdp" or "ddpo" (the baseline: docs/algorithm.md section 6)
    beta: float = 3e-5
    clip_range: float = 1e-4            # eps: per-step clip of the log-ratio (PRDP) / ratio (DDPO)
    step_reduce: str = "mean"           # [choice] mean over steps (Appendix G) or sum
    adv_clip: float = 5.0               # DDPO only: advantage clip
    # DDPO only: "tracker" = per-prompt reward statistics across epochs (DDPO's own code: a
    # buffer of the last ddpo_buffer_size rewards per prompt, whole-batch statistics until a
    # prompt has ddpo_min_count); "group" = each epoch's images of a prompt normalised together
    ddpo_advantages: str = "tracker"
    ddpo_buffer_size: int = 16
    ddpo_min_count: int = 16
    timestep_fraction: float = 1.0      # < 1 trains on a random subset of steps: APPROXIMATE gradient
    # optimizer
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    # LoRA
    lora_rank: int = 8
    lora_alpha: Optional[float] = None  # None: equal to the rank (scale 1)
    lora_targets: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # execution
    sample_batch_size: int = 8          # trajectories sampled together
    train_batch_size: int = 8           # transitions per backward micro-batch (memory knob)
    mixed_precision: str = "no"         # "no", "fp16" or "bf16" (GPU)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0           # epochs between checkpoints (0: only at the end/stop)
    # held-out evaluation (heldout.py): every eval_every epochs (0: off) on eval_prompts prompts
    # (split off the training set, 0: 4; or the first of an evaluation file, 0: all of it) x
    # eval_seeds seeds; early stop after early_stop_patience diverging evaluations (0: never)
    eval_every: int = 0
    eval_prompts: int = 0
    eval_seeds: int = 2
    early_stop_patience: int = 0
    seed: int = 0

    def replace(self, **overrides: Any) -> "TrainConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    def model_evaluations_per_epoch(self) -> Dict[str, int]:
        """UNet evaluations (one latent, one CFG branch = 1) per epoch, by phase. With policy
        'flow_sde' only the stochastic steps (all but the last, or the SDE window) get the base
        model's evaluation and are trained ('auto' is counted as ddpm: it depends on the model)."""
        trajectories = self.prompts_per_epoch * self.images_per_prompt
        branches = 2 if self.cfg != 1.0 else 1
        transitions = trajectories * self.steps
        stochastic = trajectories * self.stochastic_steps()
        trained = max(1, round(stochastic * self.timestep_fraction))
        # pass 1 is skipped only on the epoch's first optimizer step (its first minibatch, at
        # theta == theta_old); pass 2 (forward+backward) runs on every minibatch
        first_minibatch = trained * min(self.minibatch_size(), self.prompts_per_epoch) // self.prompts_per_epoch
        return {
            "sampling": transitions * branches,
            "reference": stochastic * branches,      # the base model, evaluated during sampling
            "update_forward_no_grad": (self.updates_per_epoch * trained - first_minibatch) * branches,
            "update_forward_backward": self.updates_per_epoch * trained * branches,
        }

    def minibatch_size(self) -> int:
        """Prompt groups per optimizer step (minibatch_prompts, or all N when unset)."""
        return self.minibatch_prompts or self.prompts_per_epoch

    def optimizer_steps_per_epoch(self) -> int:
        """K passes over the epoch's prompt groups, one optimizer step per minibatch. Only the
        first step is at theta == theta_old; from the second on the proximal clip can bind."""
        return self.updates_per_epoch * math.ceil(self.prompts_per_epoch / self.minibatch_size())

    def stochastic_steps(self) -> int:
        """Steps with a log-prob: the window's; else every step for ddpm, all but the last for flow_sde."""
        if self.sde_window is not None:
            return int(self.sde_window[1]) - int(self.sde_window[0])
        if self.policy != "flow_sde":
            return self.steps
        return max(0, self.steps - 1)

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the bad value and the fix; returns self when valid."""
        problems = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        kind_problems = [p for p in (_kind_problem(f.name, hint, getattr(self, f.name))
                                     for f, hint in _field_hints()) if p]
        if kind_problems:   # range checks below assume numbers are finite numbers
            raise ValueError("invalid training configuration:\n  - " + "\n  - ".join(kind_problems))
        need(self.epochs >= 1, f"epochs={self.epochs}: must be at least 1")
        need(self.prompts_per_epoch >= 1, f"prompts_per_epoch={self.prompts_per_epoch}: must be at least 1")
        need(self.images_per_prompt >= 2,
             f"images_per_prompt={self.images_per_prompt}: PRDP compares images of the same prompt, "
             "so it needs at least 2")
        need(self.updates_per_epoch >= 1, f"updates_per_epoch={self.updates_per_epoch}: must be at least 1")
        need(self.minibatch_prompts is None or self.minibatch_prompts >= 1,
             f"minibatch_prompts={self.minibatch_prompts}: must be at least 1 (or unset for all prompts)")
        need(self.steps >= 1, f"steps={self.steps}: must be at least 1")
        need(0 < self.eta <= 1, f"eta={self.eta}: must be in (0, 1] (eta=0 is deterministic DDIM, which has "
             "no log-probs; above 1 the DDIM variance is no longer valid)")
        need(self.cfg >= 1.0, f"cfg={self.cfg}: must be >= 1")
        problems.extend(_policy_problems(self))
        for name in ("width", "height"):
            value = getattr(self, name)
            need(value >= 8 and value % 8 == 0,
                 f"{name}={value}: must be a positive multiple of 8 (e.g. {max(8, value // 8 * 8)})")
        need(self.logprob_reduce in ("mean", "sum"), f"logprob_reduce={self.logprob_reduce!r}: use 'mean' or 'sum'")
        need(self.step_reduce in ("mean", "sum"), f"step_reduce={self.step_reduce!r}: use 'mean' or 'sum'")
        need(self.algorithm in ("prdp", "ddpo"), f"algorithm={self.algorithm!r}: use 'prdp' or 'ddpo'")
        need(self.ddpo_advantages in ("tracker", "group"),
             f"ddpo_advantages={self.ddpo_advantages!r}: use 'tracker' (DDPO's per-prompt statistics) or 'group'")
        need(1 <= self.ddpo_min_count <= self.ddpo_buffer_size,
             f"ddpo_min_count={self.ddpo_min_count}, ddpo_buffer_size={self.ddpo_buffer_size}: need "
             "1 <= ddpo_min_count <= ddpo_buffer_size")
        need(self.beta > 0, f"beta={self.beta}: must be > 0")
        need(self.clip_range > 0, f"clip_range={self.clip_range}: must be > 0")
        need(0 < self.timestep_fraction <= 1, f"timestep_fraction={self.timestep_fraction}: must be in (0, 1]")
        need(self.learning_rate > 0, f"learning_rate={self.learning_rate}: must be > 0")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay}: must be >= 0")
        need(self.grad_clip > 0, f"grad_clip={self.grad_clip}: must be > 0")
        need(self.lora_rank >= 1, f"lora_rank={self.lora_rank}: must be at least 1")
        need(len(self.lora_targets) > 0, "lora_targets is empty: name at least one module (e.g. to_q)")
        need(self.sample_batch_size >= 1, f"sample_batch_size={self.sample_batch_size}: must be at least 1")
        need(self.train_batch_size >= 1, f"train_batch_size={self.train_batch_size}: must be at least 1")
        need(self.mixed_precision in ("no", "fp16", "bf16"),
             f"mixed_precision={self.mixed_precision!r}: use 'no', 'fp16' or 'bf16'")
        need(self.checkpoint_every >= 0, f"checkpoint_every={self.checkpoint_every}: must be >= 0")
        need(self.eval_every >= 0, f"eval_every={self.eval_every}: must be >= 0 (0: no held-out evaluation)")
        need(self.eval_prompts >= 0, f"eval_prompts={self.eval_prompts}: must be >= 0")
        need(1 <= self.eval_seeds <= 64, f"eval_seeds={self.eval_seeds}: must be 1 to 64")
        need(self.early_stop_patience >= 0, f"early_stop_patience={self.early_stop_patience}: must be >= 0")
        need(not self.early_stop_patience or self.eval_every,
             f"early_stop_patience={self.early_stop_patience} needs the held-out evaluation: set eval_every too")
        need(self.adv_clip > 0, f"adv_clip={self.adv_clip}: must be > 0")
        need(self.adam_eps > 0, f"adam_eps={self.adam_eps}: must be > 0 (e.g. 1e-8)")
        need(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
             f"adam_betas={tuple(self.adam_betas)}: need two numbers in [0, 1), e.g. (0.9, 0.999)")
        need(self.lora_alpha is None or self.lora_alpha > 0,
             f"lora_alpha={self.lora_alpha}: must be > 0 (or unset: equal to the rank)")
        need(0 <= self.seed < 2 ** 64, f"seed={self.seed}: must be in [0, 2**64)")
        if problems:
            raise ValueError("invalid training configuration:\n  - " + "\n  - ".join(problems))
        return self


def _policy_problems(config: "TrainConfig") -> List[str]:
    """What is wrong with the policy options (policies/ holds the samplers)."""
    problems = []
    if config.policy not in ("auto", "ddpm", "flow_sde"):
        problems.append(f"policy={config.policy!r}: use 'auto' (ddpm for eps / v-prediction models, flow_sde "
                        "for flow models), 'ddpm' or 'flow_sde'")
    if not 0 < config.flow_noise_level <= 1:
        problems.append(f"flow_noise_level={config.flow_noise_level}: must be in (0, 1] (Flow-GRPO uses 0.7)")
    if config.flow_sde_variant not in ("sde", "cps"):
        problems.append(f"flow_sde_variant={config.flow_sde_variant!r}: use 'sde' (Flow-GRPO) or 'cps'")
    if config.flow_guidance is not None and config.flow_guidance < 0:
        problems.append(f"flow_guidance={config.flow_guidance}: must be >= 0 (Flux.1-dev: 3.5, as FluxGuidance)")
    window = config.sde_window
    if window is not None:
        # ddpm may make every step stochastic; flow's last step is always a deterministic ODE step
        # ('auto' is checked here against steps, and again by the policy the model selects)
        last = config.steps - 1 if config.policy == "flow_sde" else config.steps
        if len(window) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in window) \
                or not 0 <= window[0] < window[1] <= last:
            why = " (the last flow step is deterministic)" if config.policy == "flow_sde" else ""
            problems.append(f"sde_window={list(window)}: need [first, stop] with 0 <= first < stop <= {last}{why}")
    return problems


def _field_hints():
    """(field, resolved type) of every TrainConfig field."""
    hints = typing.get_type_hints(TrainConfig)
    return [(f, hints[f.name]) for f in dataclasses.fields(TrainConfig)]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _kind_problem(name: str, hint: Any, value: Any) -> Optional[str]:
    """What is wrong with the kind of `value` for a field typed `hint` (None when it fits):
    whole numbers must be ints, floats finite numbers (no inf/nan)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if hint is bool:
        return None if isinstance(value, bool) else f"{name}={value!r}: must be true or false"
    if hint is int:
        return None if isinstance(value, numbers.Integral) and not isinstance(value, bool) else \
            f"{name}={value!r}: must be a whole number"
    if hint is float:
        if not _is_number(value):
            return f"{name}={value!r}: must be a number"
        return None if math.isfinite(value) else f"{name}={value!r}: must be a finite number (not inf or nan)"
    if hint is str:
        return None if isinstance(value, str) else f"{name}={value!r}: must be text"
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return f"{name}={value!r}: must be a list"
        item = args[0] if args else Any
        for index, element in enumerate(value):
            problem = _kind_problem(f"{name}[{index}]", item, element) if item is not Any else None
            if problem:
                return problem
    return None


# Optimizer steps per epoch (TrainConfig.optimizer_steps_per_epoch): K passes over the epoch's
# samples, one step per minibatch of minibatch_prompts prompt groups, as DDPO's training loop
# (which the paper follows) steps once per minibatch. Only the first step of an epoch is at
# theta == theta_old, where the proximal clip cannot bind and beta only scales a gradient that
# Adam normalises: every preset but world-demo takes several steps per epoch. Table 4's K = 1
# rows (large scale, multi-reward) are read as one pass split into 4 minibatch steps (the
# literal single step: minibatch_prompts 64); the consumer presets keep K = 1 and split their
# prompts into 2 minibatches, which adds the no-grad pass 1 of the second minibatch (half an
# update's forwards) and lowers no memory peak (micro-batches are train_batch_size either way).
PRESETS: Dict[str, Dict[str, Any]] = {
    # Table 4, small scale (45 animal prompts): full-UNet learning rate as in the paper
    "paper-small": dict(epochs=100, updates_per_epoch=10, prompts_per_epoch=32, images_per_prompt=16,
                        beta=3e-5, clip_range=1e-6, steps=50, cfg=5.0, learning_rate=1e-5,
                        weight_decay=1e-4, grad_clip=1.0, width=512, height=512),
    # Table 4, large scale (>100K prompts)
    "paper-large": dict(epochs=1000, updates_per_epoch=1, minibatch_prompts=16, prompts_per_epoch=64,
                        images_per_prompt=8,
                        beta=3e-6, clip_range=1e-4, steps=50, cfg=5.0, learning_rate=7e-6,
                        weight_decay=1e-4, grad_clip=1.0, width=512, height=512),
    # Table 4, multi-reward (PickScore 10, HPSv2 2, aesthetic 0.05)
    "paper-multi-reward": dict(epochs=1000, updates_per_epoch=1, minibatch_prompts=16, prompts_per_epoch=64,
                               images_per_prompt=8,
                               beta=3e-5, clip_range=1e-4, steps=50, cfg=5.0, learning_rate=1e-5,
                               weight_decay=1e-4, grad_clip=1.0, width=512, height=512),
    # one consumer GPU: a LoRA, fewer steps and images; LoRA-sized learning rate
    "consumer-gpu": dict(epochs=50, updates_per_epoch=1, minibatch_prompts=2, prompts_per_epoch=4,
                         images_per_prompt=4,
                         beta=3e-5, clip_range=1e-4, steps=20, cfg=5.0, learning_rate=3e-4,
                         lora_rank=8, width=512, height=512, sample_batch_size=4, train_batch_size=4,
                         mixed_precision="fp16", gradient_checkpointing=True),
    # one consumer GPU, SDXL and its finetunes at their native 1024 px. UNet evaluations per
    # epoch (TrainConfig.model_evaluations_per_epoch): 320 sampling + 320 reference (base model,
    # LoRA off, during sampling) + 160 update forward (pass 1 of the second minibatch) + 320
    # forward+backward = 1120, i.e. 2 prompts x 4 images x 20 steps x 2 CFG branches per phase
    # (one prompt for pass 1). Peak GPU memory at real size (benchmarks/memory_budget.py,
    # fake tensors; docs/gpu.md "On one GPU"): CLI 8.65 GB (the float32 decode of one 1024 px image
    # beside the fp16 UNet), ComfyUI 6.70 GB, with 0.5 GB of CUDA context: 12 GB cards fit
    "consumer-gpu-sdxl": dict(epochs=50, updates_per_epoch=1, minibatch_prompts=1, prompts_per_epoch=2,
                              images_per_prompt=4,
                              beta=3e-5, clip_range=1e-4, steps=20, cfg=5.0, learning_rate=3e-4,
                              lora_rank=8, width=1024, height=1024, sample_batch_size=2, train_batch_size=1,
                              mixed_precision="fp16", gradient_checkpointing=True),
    # flow models (policy flow_sde). beta / clip_range do not transfer between policies: the same
    # model change gives flow-SDE trajectory log-ratios ~0.15x DDPM's (first-order estimate from
    # the schedules, benchmarks/policy_logratio_scale.py: SD3 shift 3.0 at 20 steps 0.157, Flux
    # mu 1.15 at 16 steps 0.150, a = 0.7), so the consumer-gpu values become beta 3e-5 / 0.15 ~ 2e-4
    # and clip 1e-4 x 0.15 ~ 1.5e-5. Starting points, not tuned on real models.
    # Flux.1-dev: guidance-distilled, so cfg 1 (the guidance value is conditioning, 3.5 by
    # default as ComfyUI without a FluxGuidance node); 16 steps as DanceGRPO; 512 px as Flow-GRPO.
    # Transformer evaluations per epoch (model_evaluations_per_epoch): 128 sampling + 120 base
    # model + 60 update forward + 120 forward+backward = 428 (8 trajectories x 16 steps, 15 of
    # them stochastic; pass 1 for the second minibatch's 4).
    # Peak GPU memory at real size (benchmarks/memory_budget.py): ComfyUI with fp8 weights 13.84 GB;
    # CLI 21.53 GB (its base stored in fp8 on cards where bf16 + 8 GiB do not fit; the peak is
    # T5-XXL encoding beside the fp8 transformer), with 0.5 GB of CUDA context
    "consumer-gpu-flux": dict(epochs=50, updates_per_epoch=1, minibatch_prompts=1, prompts_per_epoch=2,
                              images_per_prompt=4,
                              policy="flow_sde", flow_noise_level=0.7, beta=2e-4, clip_range=1.5e-5, steps=16,
                              cfg=1.0, flow_guidance=3.5, learning_rate=1e-4, lora_rank=16, width=512, height=512,
                              sample_batch_size=2, train_batch_size=1, mixed_precision="bf16",
                              gradient_checkpointing=True),
    # SD3.5 (Medium; Large the same with more memory): CFG 4.5 as Flow-GRPO, 20 steps, LoRA r32
    # alpha 64 and lr 3e-4 as Flow-GRPO's SD3.5-M recipe. Evaluations per epoch: 320 sampling +
    # 304 base model + 152 update forward + 304 forward+backward = 1080 (8 trajectories x 20
    # steps x 2 CFG branches, 19 stochastic; pass 1 for the second minibatch's 4). Peak GPU
    # memory at real size (benchmarks/memory_budget.py, CLI): 15.19 GB while T5-XXL encodes
    # beside the MMDiT (the encoders visit the GPU one at a time), 7.9 GB otherwise
    "consumer-gpu-sd35": dict(epochs=50, updates_per_epoch=1, minibatch_prompts=1, prompts_per_epoch=2,
                              images_per_prompt=4,
                              policy="flow_sde", flow_noise_level=0.7, beta=2e-4, clip_range=1.5e-5, steps=20,
                              cfg=4.5, learning_rate=3e-4, lora_rank=32, lora_alpha=64.0, width=512, height=512,
                              sample_batch_size=2, train_batch_size=1, mixed_precision="bf16",
                              gradient_checkpointing=True),
    # --- the human reward (issue 24): a person answers each epoch's ballot, so an epoch is few
    # prompts x few images (2 x 4: 2 best/worst clicks), few steps (images in seconds), K = 4
    # updates on the same answers (the proximal clip makes the most of each costly judgement) and
    # a checkpoint every epoch (a person's answers are never lost to a crash). beta for rewards
    # of human scale (best 1, worst -1; consumer-gpu's 3e-5 is for PickScore x 10 differences).
    "human-quick": dict(epochs=20, updates_per_epoch=4, prompts_per_epoch=2, images_per_prompt=4,
                        beta=1e-4, clip_range=1e-4, steps=12, cfg=5.0, learning_rate=3e-4,
                        lora_rank=8, width=512, height=512, sample_batch_size=4, train_batch_size=4,
                        mixed_precision="fp16", gradient_checkpointing=True, checkpoint_every=1),
    # --- end human-quick
    # two CPU cores, the embedded tiny model: minutes, not hours
    "cpu-smoke": dict(epochs=10, updates_per_epoch=4, prompts_per_epoch=4, images_per_prompt=4,
                      beta=0.05, clip_range=0.05, steps=8, cfg=3.0, learning_rate=0.02,
                      lora_rank=4, width=64, height=64, sample_batch_size=16, train_batch_size=16),
    # the miniature world (--base embedded-world, 32 px) on two CPU cores: the best measured
    # setting, which does NOT yet raise unseen-prompt alignment clear of noise (docs/research.md). One
    # update per epoch (on-policy: beta only scales the gradient, which Adam normalises, and the
    # clip never binds) costs ~40 % of cpu-smoke's four, so 12 epochs x 8 prompts fit the time.
    # The LoRA is on self-attention only: on the earlier split (held-out shape-colour pairs) the
    # cross-attention's LoRA learned the training pairs at the expense of the unseen ones (seed
    # 0, lr 0.01: unseen -0.73 std), and on the current split rank 16 on all attention fell -1.39 std
    "world-demo": dict(epochs=12, updates_per_epoch=1, prompts_per_epoch=8, images_per_prompt=4,
                       beta=0.01, clip_range=0.05, steps=8, cfg=3.0, learning_rate=0.01,
                       lora_rank=4, lora_targets=["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"],
                       width=32, height=32, sample_batch_size=16, train_batch_size=16),
}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """A preset by name with overrides applied, validated. A preset that splits each pass into
    m minibatches keeps m when `prompts_per_epoch` is overridden and `minibatch_prompts` is not
    (its minibatch becomes ceil(N / m) prompts), so another N keeps the off-policy steps that
    let the proximal clip bind, instead of one step (N <= the preset's minibatch) or N steps."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    values = PRESETS[name]
    if values.get("minibatch_prompts") and overrides.get("prompts_per_epoch") and \
            overrides.get("minibatch_prompts") is None:
        minibatches = math.ceil(values["prompts_per_epoch"] / values["minibatch_prompts"])
        overrides = dict(overrides, minibatch_prompts=math.ceil(int(overrides["prompts_per_epoch"]) / minibatches))
    return TrainConfig().replace(**values).replace(**overrides).validate()
