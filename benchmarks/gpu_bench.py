"""The GPU check of PRDP training at real model sizes (issues 13.4 and 20.5), one table.

Random-weight models of the real sizes, built from configs on the device (nothing is
downloaded): SD1.5 (UNet 860M, CLIP-L) at 512 px with the consumer-gpu preset and SDXL (UNet
2.6B, CLIP-L + OpenCLIP bigG) at 1024 px with consumer-gpu-sdxl, through the diffusers backend.
The whole process runs under the memory of a 12 GB card (torch.cuda.set_per_process_memory_fraction:
12 GB less 0.5 GB of CUDA context for PyTorch's allocator). Rows, each with a check that passes
or fails:

* neural reward  the aesthetic reward on a tiny CLIP the script writes, built the way the Load
                 Reward node builds it (create_reward under torch.inference_mode()), then
                 used by a training epoch outside inference mode, as the node's job thread: its move to
                 the GPU copies the weights, which is where inference tensors break ("Inference
                 tensors do not track version counter"). On the CPU a move copies nothing, so
                 --cpu follows each of the reward's own moves with a float64 round trip, a copy.
* epoch          seconds per epoch by phase (sampling incl. the reference log-probs, reward,
                 update) in fp16 and in bf16, the time against the FLOP floor (the UNet FLOPs of
                 the epoch, counted on the meta device, over the matmul peak measured here), and
                 the peak memory against the preset's budget (SD1.5 8 GB, SDXL 12 GB; peak
                 allocated + 0.5 GB of CUDA context, as benchmarks/memory_budget.py counts);
* ddpo           the same SD1.5 epoch with algorithm=ddpo, and the PRDP/DDPO epoch-time ratio;
* T=..           peak memory of the update phase at two step counts (the two-pass gradient keeps
                 it flat: a ratio over 1.1 fails);
* onpolicy fp32  the on-policy check in fp32 with TF32 off, the reference for fp16 / bf16.

A row fails on an exception (out of memory under the cap included), a non-finite metric, peak
memory over the budget, an epoch faster than its floor (a broken measurement) or slower than
FLOOR_LIMIT floors on a GPU (a CPU fallback, a sync per operation...). Random weights draw
noise, so rewards mean nothing here: the table is about crashes, time and memory. On CUDA each
measured epoch follows a 2-step warm-up epoch of the same model. Rows start in priority order;
after --deadline seconds the rest are reported as not run (failed).

    python benchmarks/gpu_bench.py                 (needs CUDA; ~4 minutes on an H100, estimated: not yet run on a GPU)
    python benchmarks/gpu_bench.py --cpu           (toy sizes on the CPU: tries the script out)
    python benchmarks/gpu_bench.py --sizes         (parameter counts of the real-size configs, on meta)
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfyui_prdp.config import TrainConfig, preset  # noqa: E402
from comfyui_prdp.models.embedded import SCHEDULER_CONFIG  # noqa: E402

PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a fox", "a photo of an owl",
           "a painting of a horse", "a painting of a rabbit"]

GB = 2 ** 30
#: the card imitated, and the CUDA context it holds outside PyTorch's allocator (memory_budget.py's)
CARD_GB = 12.0
CUDA_CONTEXT_GB = 0.5
#: the issue-20 budgets: peak allocated memory of a whole epoch plus the CUDA context
BUDGET_GB = {"consumer-gpu": 8.0, "consumer-gpu-sdxl": 12.0}
#: an epoch slower than this many FLOP floors fails on a GPU (expected: a few floors; an estimate,
#: no GPU has run this yet)
FLOOR_LIMIT = 30.0
#: update-phase peak at the higher T over the lower one above this fails (the update must be flat in T)
FLAT_LIMIT = 1.10
#: seconds after which no further row starts (gpu_check.sh stops the process at 480 s)
DEFAULT_DEADLINE_S = 330.0
WARMUP_STEPS = 2
#: the name of the neural-reward row (after the model's name; its precision follows)
NEURAL_REWARD_ROW = "neural reward (aesthetic built under inference_mode)"

# --- real-size configs (the public SD1.5 / SDXL base architectures) ----------------------
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              vocab_size=49408, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  vocab_size=49408, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)

# --- toy configs (--cpu): the same component types, tiny ---------------------------------
TOY_SD15_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                     attention_head_dim=8)
TOY_SDXL_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                     attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + 32)
TOY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408,
                max_position_embeddings=77, projection_dim=32, hidden_act="gelu")
TOY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(16, 16, 32, 32),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               norm_num_groups=8)
#: --cpu settings: toy sizes, few steps (the presets' precision and checkpointing are kept)
TOY_RUN = dict(prompts_per_epoch=1, images_per_prompt=2, steps=2, width=32, height=32,
               sample_batch_size=2, train_batch_size=2)
TOY_STEPS = (2, 5)
REAL_STEPS = (20, 50)
#: a short run: the neural-reward and fp32 on-policy rows, and the update-memory rows' group size
SHORT_RUN = dict(prompts_per_epoch=1, images_per_prompt=2, steps=4, sample_batch_size=2, train_batch_size=2)

#: the tiny CLIP of the neural reward (projection 32: the aesthetic head is built to match)
TINY_REWARD_CLIP = dict(
    text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=77),
    vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2),
    projection_dim=32)


class Model:
    """One benchmarked model: how to build its backend components, and its preset."""

    def __init__(self, name: str, preset_name: str, unet: dict, text: List[dict], vae: dict, sdxl: bool):
        self.name, self.preset_name, self.unet, self.text, self.vae, self.sdxl = \
            name, preset_name, unet, text, vae, sdxl

    def components(self, device: torch.device, frozen_dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> Dict[str, object]:
        """Random-weight components created on `device`, one at a time, the UNet and text encoders
        cast to `frozen_dtype` as soon as each is built (so only one float32 copy is ever there,
        as when a user loads fp16 weights); the VAE stays float32 as the backend keeps it."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from comfyui_prdp.models.tokenizer_offline import offline_clip_tokenizer

        # torch's own Module.to: diffusers' override warns about fp32 modules even when there are none
        cast = lambda module: torch.nn.Module.to(module, frozen_dtype)  # noqa: E731
        torch.manual_seed(seed)
        with torch.device(device):
            parts = {"unet": cast(UNet2DConditionModel(**self.unet)),
                     "text_encoder": cast(CLIPTextModel(CLIPTextConfig(**self.text[0]))),
                     "vae": AutoencoderKL(**self.vae)}
            if self.sdxl:
                parts["text_encoder_2"] = cast(CLIPTextModelWithProjection(CLIPTextConfig(**self.text[1])))
        parts = {k: v.eval() for k, v in parts.items()}
        parts["tokenizer"] = offline_clip_tokenizer()
        if self.sdxl:
            parts["tokenizer_2"] = offline_clip_tokenizer()
        parts["scheduler"] = DDIMScheduler(**SCHEDULER_CONFIG)
        return parts

    def backend(self, config: TrainConfig, device: torch.device):
        from comfyui_prdp.backends.diffusers_backend import DiffusersBackend, frozen_weight_dtype
        from comfyui_prdp.backends.diffusers_sdxl import DiffusersSDXLBackend

        cls = DiffusersSDXLBackend if self.sdxl else DiffusersBackend
        parts = self.components(device, frozen_weight_dtype(device, config.mixed_precision))
        return cls(**parts, config=config, device=device, model_name=self.name)

    def parameter_counts(self) -> Dict[str, int]:
        """Parameters of each component, counted on the meta device (no memory)."""
        parts = self.components(torch.device("meta"))
        return {k: sum(p.numel() for p in v.parameters()) for k, v in parts.items() if hasattr(v, "parameters")}

    def unet_flops_per_latent(self, config: TrainConfig) -> float:
        """FLOPs of one UNet forward on one latent of the config's size (one CFG branch),
        counted by torch's FlopCounterMode on the meta device (no memory, no device time)."""
        from diffusers import UNet2DConditionModel
        from torch.utils.flop_counter import FlopCounterMode

        height, width = config.height // 8, config.width // 8
        with torch.device("meta"):
            unet = UNet2DConditionModel(**self.unet)
            extra = {}
            if self.sdxl:
                time_dim = self.unet["addition_time_embed_dim"]
                text_dim = self.unet["projection_class_embeddings_input_dim"] - 6 * time_dim
                extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, text_dim), "time_ids": torch.zeros(1, 6)}
            with FlopCounterMode(display=False) as counter:
                unet(torch.zeros(1, self.unet["in_channels"], height, width), torch.tensor([500]),
                     torch.zeros(1, 77, self.unet["cross_attention_dim"]), **extra)
        return float(counter.get_total_flops())


def models(toy: bool) -> List[Model]:
    if toy:
        return [Model("SD1.5 (toy)", "consumer-gpu", TOY_SD15_UNET, [TOY_CLIP], TOY_VAE, False),
                Model("SDXL (toy)", "consumer-gpu-sdxl", TOY_SDXL_UNET, [TOY_CLIP, TOY_CLIP], TOY_VAE, True)]
    return [Model("SD1.5", "consumer-gpu", SD15_UNET, [CLIP_L], SD_VAE, False),
            Model("SDXL", "consumer-gpu-sdxl", SDXL_UNET, [CLIP_L, CLIP_BIG_G], dict(SD_VAE, scaling_factor=0.13025),
                  True)]


# --- measuring ---------------------------------------------------------------------------
class PeakMemory:
    """Trainer callback: peak allocated / reserved bytes of the epoch, and allocated of its
    update phase alone (None on the CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.epoch_peak: Optional[int] = None
        self.reserved_peak: Optional[int] = None
        self.update_peak: Optional[int] = None

    def __call__(self, event: dict) -> None:
        if not self.cuda:
            return
        if event["type"] == "phase" and event["phase"] == "sampling":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif event["type"] == "phase" and event["phase"] == "update":
            self._read()
            torch.cuda.reset_peak_memory_stats()
        elif event["type"] == "epoch":
            self.update_peak = self._read()

    def _read(self) -> int:
        torch.cuda.synchronize()
        allocated = torch.cuda.max_memory_allocated()
        self.epoch_peak = max(self.epoch_peak or 0, allocated)
        self.reserved_peak = max(self.reserved_peak or 0, torch.cuda.max_memory_reserved())
        return allocated


def measure_epoch(backend, config: TrainConfig, reward, device: torch.device, warm_up: bool = True) -> dict:
    """Metrics of one epoch (after a WARMUP_STEPS-step epoch of the same model on CUDA) and its
    peak memory."""
    from comfyui_prdp.trainer import Trainer

    if warm_up and device.type == "cuda":
        Trainer(backend, reward, PROMPTS, config.replace(epochs=1, steps=WARMUP_STEPS)).run()
    memory = PeakMemory(device)
    result = Trainer(backend, reward, PROMPTS, config.replace(epochs=1), callback=memory).run()
    metrics = dict(result.metrics[-1])
    metrics.update(peak_bytes=memory.epoch_peak, reserved_bytes=memory.reserved_peak,
                   update_peak_bytes=memory.update_peak)
    return metrics


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The best square-matmul throughput measured here, TFLOP/s (the ceiling of the floor)."""
    size, repeats = (8192, 10) if device.type == "cuda" else (384, 4)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for trial in range(4):          # the first is a warm-up
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        if trial:
            best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 * repeats / best / 1e12


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_forward_equivalents(config: TrainConfig) -> int:
    """UNet forwards of one latent per epoch, a forward+backward counted as 3 (recomputation by
    gradient checkpointing not counted: the floor stays a floor)."""
    counts = config.model_evaluations_per_epoch()
    return (counts["sampling"] + counts["reference"] + counts["update_forward_no_grad"]
            + 3 * counts["update_forward_backward"])


def apply_card_cap(device: torch.device) -> str:
    """Limit PyTorch's allocator to a CARD_GB card less its CUDA context; a description."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, (CARD_GB - CUDA_CONTEXT_GB) * GB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return (f"memory cap {fraction * total / GB:.1f} GB of {total / GB:.1f} GB "
            f"(a {CARD_GB:g} GB card less {CUDA_CONTEXT_GB} GB of CUDA context)")


# --- the neural reward, built as the Load Reward node builds it -------------------------
def write_tiny_aesthetic(folder: Path) -> Tuple[Path, Path]:
    """(head .pth, CLIP folder) of an aesthetic reward on a tiny random CLIP, in its file formats."""
    from transformers import CLIPConfig, CLIPModel

    from comfyui_prdp.rewards.aesthetic import AestheticMLP

    torch.manual_seed(1)
    clip_folder, head = folder / "tiny-clip", folder / "tiny-aesthetic-head.pth"
    CLIPModel(CLIPConfig(**TINY_REWARD_CLIP)).save_pretrained(clip_folder)
    torch.save(AestheticMLP(TINY_REWARD_CLIP["projection_dim"]).state_dict(), head)
    return head, clip_folder


def node_built_reward(folder: Path, device: torch.device):
    """The aesthetic reward created under torch.inference_mode(), as ComfyUI runs the Load Reward
    node (its modules' tensors are then inference tensors unless the reward repairs them)."""
    from comfyui_prdp.rewards import create_reward

    head, clip_folder = write_tiny_aesthetic(folder)
    with torch.inference_mode():
        return create_reward("aesthetic", path=str(head), clip_path=str(clip_folder), device=str(device),
                             allow_download=False)


def copy_after_each_move(reward) -> None:
    """Follow each of the reward's own moves (prepare) with a float64 round trip of its modules:
    on the CPU a move to the CPU copies nothing, and this copy is what a move to a GPU does."""
    own_prepare = reward.prepare

    def prepare_then_copy() -> None:
        own_prepare()
        for module in reward.modules():
            dtype = next(module.parameters()).dtype
            module.to(torch.float64).to(dtype)

    reward.prepare = prepare_then_copy


# --- the table ---------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    run: str
    size: str = ""
    seconds: str = ""
    floor: str = ""
    memory: str = ""
    note: str = ""
    problems: List[str] = dataclasses.field(default_factory=list)

    @property
    def check(self) -> str:
        return "ok" if not self.problems else "FAIL: " + "; ".join(self.problems)

    def cells(self) -> List[str]:
        return [self.run, self.size, self.seconds, self.floor, self.memory, self.note, self.check]


HEADER = ["run", "size", "seconds per epoch (by phase)", "time / FLOP floor", "peak memory", "note", "check"]


class Table:
    def __init__(self):
        self.rows: List[Row] = []

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print("  " + " | ".join(row.cells()), flush=True)    # as it comes, in case a later row hangs

    @property
    def failed(self) -> int:
        return sum(bool(row.problems) for row in self.rows)

    def print(self) -> None:
        rows = [HEADER] + [row.cells() for row in self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        print("\n" + line(HEADER))
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in self.rows:
            print(line(row.cells()))

    def write_json(self, path: Path) -> None:
        """The rows as JSON, written atomically."""
        path = Path(path)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps([dataclasses.asdict(row) | {"check": row.check} for row in self.rows],
                                        indent=1))
        os.replace(temporary, path)


def phase_seconds(metrics: dict) -> float:
    return sum(metrics[f"seconds_{phase}"] for phase in ("sampling", "reward", "update"))


def seconds_cell(metrics: dict) -> str:
    parts = [f"{phase} {metrics[f'seconds_{phase}']:.2f}" for phase in ("sampling", "reward", "update")]
    return f"{phase_seconds(metrics):.2f} s ({', '.join(parts)})"


def size_cell(config: TrainConfig) -> str:
    return f"{config.width}px N={config.prompts_per_epoch} B={config.images_per_prompt} T={config.steps}"


def precision_label(config: TrainConfig, device: torch.device) -> str:
    label = "fp32" if config.mixed_precision == "no" else config.mixed_precision
    return label if device.type == "cuda" or label == "fp32" else f"{label} (CPU runs fp32)"


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"


def finite_problems(metrics: dict, keys: Sequence[str] = ("reward_mean", "loss", "onpolicy_max_diff")) -> List[str]:
    return [f"{key} is {metrics[key]}" for key in keys
            if isinstance(metrics.get(key), float) and not math.isfinite(metrics[key])]


# --- the check ---------------------------------------------------------------------------
class Check:
    """Runs the rows in priority order and collects them in a Table."""

    def __init__(self, device: torch.device, toy: bool, deadline: float, scratch: Path):
        from comfyui_prdp.rewards import create_reward

        self.device, self.toy, self.deadline, self.scratch = device, toy, deadline, scratch
        self.started = time.perf_counter()
        self.table = Table()
        self.jpeg = create_reward("jpeg-compressibility")
        self.sd15, self.sdxl = models(toy)
        self.prdp_seconds: Dict[str, float] = {}
        self.update_peaks: Dict[int, Optional[int]] = {}
        self._peaks: Dict[torch.dtype, float] = {}
        self._flops: Dict[Tuple[str, int, int], float] = {}

    # --- configs and rows ------------------------------------------------------------------
    def config(self, model: Model, precision: Optional[str] = None, **settings) -> TrainConfig:
        overrides = {**(TOY_RUN if self.toy else {}), **settings}
        if precision is not None:
            overrides["mixed_precision"] = precision
        return preset(model.preset_name, **overrides)

    def short(self, model: Model, precision: Optional[str] = None, **settings) -> TrainConfig:
        steps = TOY_STEPS[0] if self.toy else SHORT_RUN["steps"]
        return self.config(model, precision, **{**SHORT_RUN, "steps": steps, **settings})

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.started > self.deadline

    def group(self, model: Model, precision: str, rows: List[Tuple[str, Callable[[object], Row]]]) -> None:
        """Build the model's backend in `precision` once and run `rows` on it; a failed build
        fails each of its rows."""
        if self.out_of_time():
            for label, _ in rows:
                self.table.add(Row(label, problems=[f"not run: past the {self.deadline:.0f} s deadline"]))
            return
        try:
            backend = model.backend(self.config(model, precision), self.device)
        except Exception as error:  # noqa: BLE001  (reported in the table)
            for label, _ in rows:
                self.table.add(Row(label, problems=[f"building the model: {describe(error)}"]))
            self.free()
            return
        try:
            for label, body in rows:
                self.row(label, lambda body=body: body(backend))
        finally:
            del backend
            self.free()

    def row(self, label: str, body: Callable[[], Row]) -> None:
        if self.out_of_time():
            self.table.add(Row(label, problems=[f"not run: past the {self.deadline:.0f} s deadline"]))
            return
        try:
            row = body()
        except Exception as error:  # noqa: BLE001  (reported in the table)
            row = Row(label, problems=[describe(error)])
        row.run = label
        self.free()
        self.table.add(row)

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- judging -----------------------------------------------------------------------------
    def peak_tflops(self, config: TrainConfig) -> float:
        from comfyui_prdp.backends.diffusers_backend import frozen_weight_dtype

        dtype = frozen_weight_dtype(self.device, config.mixed_precision)
        if dtype not in self._peaks:
            self._peaks[dtype] = matmul_peak_tflops(self.device, dtype)
        return self._peaks[dtype]

    def floor_seconds(self, model: Model, config: TrainConfig) -> float:
        key = (model.name, config.height, config.width)
        if key not in self._flops:
            self._flops[key] = model.unet_flops_per_latent(config)
        return epoch_forward_equivalents(config) * self._flops[key] / (self.peak_tflops(config) * 1e12)

    def judge_time(self, row: Row, model: Model, config: TrainConfig, metrics: dict) -> None:
        floor = self.floor_seconds(model, config)
        ratio = phase_seconds(metrics) / floor
        row.floor = f"{ratio:.1f}x of {floor:.3g} s"
        if ratio < 1:
            row.problems.append(f"faster than the FLOP floor ({ratio:.2f}x): the measurement is broken")
        elif self.device.type == "cuda" and ratio > FLOOR_LIMIT:
            row.problems.append(f"{ratio:.0f}x the FLOP floor (limit {FLOOR_LIMIT:g}x)")

    def judge_memory(self, row: Row, model: Model, metrics: dict) -> None:
        if metrics["peak_bytes"] is None:
            row.memory = "n/a (CPU)"
            return
        budget = BUDGET_GB[model.preset_name]
        needed = metrics["peak_bytes"] / GB + CUDA_CONTEXT_GB
        row.memory = (f"{needed:.2f} GB of {budget:g} (allocated + ctx; reserved "
                      f"{metrics['reserved_bytes'] / GB:.2f})")
        if needed > budget:
            row.problems.append(f"{needed:.2f} GB is over the {budget:g} GB budget")

    # --- rows ------------------------------------------------------------------------------
    def epoch_row(self, model: Model, backend, config: TrainConfig) -> Row:
        metrics = measure_epoch(backend, config, self.jpeg, self.device)
        self.prdp_seconds[model.name] = phase_seconds(metrics)
        row = Row("", size_cell(config), seconds_cell(metrics), note=f"onpolicy {metrics['onpolicy_max_diff']:.2e}",
                  problems=finite_problems(metrics))
        self.judge_time(row, model, config, metrics)
        self.judge_memory(row, model, metrics)
        return row

    def ddpo_row(self, model: Model, backend, config: TrainConfig) -> Row:
        metrics = measure_epoch(backend, config.replace(algorithm="ddpo"), self.jpeg, self.device)
        prdp = self.prdp_seconds.get(model.name)
        note = f"PRDP/DDPO epoch time {prdp / phase_seconds(metrics):.2f}" if prdp else "no PRDP epoch to compare"
        row = Row("", size_cell(config), seconds_cell(metrics), note=note,
                  problems=finite_problems(metrics, ("reward_mean", "loss")))
        if prdp is None:
            row.problems.append("the PRDP epoch it is compared with failed")
        self.judge_memory(row, model, metrics)
        return row

    def neural_reward_row(self, backend, config: TrainConfig) -> Row:
        reward = node_built_reward(self.scratch, self.device)
        if self.device.type == "cpu":
            copy_after_each_move(reward)
        metrics = measure_epoch(backend, config, reward, self.device, warm_up=False)
        return Row("", size_cell(config), seconds_cell(metrics),
                   note=f"reward mean {metrics['reward_mean']:.3f}, scored on {reward.device}",
                   problems=finite_problems(metrics))

    def update_memory_row(self, backend, config: TrainConfig, low: int, high: int) -> Row:
        metrics = measure_epoch(backend, config, self.jpeg, self.device)
        self.update_peaks[config.steps] = metrics["update_peak_bytes"]
        row = Row("", size_cell(config), seconds_cell(metrics), problems=finite_problems(metrics))
        peak = metrics["update_peak_bytes"]
        row.memory = "n/a (CPU)" if peak is None else f"{peak / GB:.2f} GB (update phase)"
        if config.steps == high and peak is not None and self.update_peaks.get(low):
            ratio = peak / self.update_peaks[low]
            row.note = f"update peak T={high}/T={low}: {ratio:.3f}"
            if ratio > FLAT_LIMIT:
                row.problems.append(f"the update peak grows with T ({ratio:.2f}x, limit {FLAT_LIMIT})")
        return row

    def onpolicy_row(self, backend, config: TrainConfig) -> Row:
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            metrics = measure_epoch(backend, config, self.jpeg, self.device)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        return Row("", size_cell(config), seconds_cell(metrics),
                   note=f"onpolicy max abs diff {metrics['onpolicy_max_diff']:.2e}", problems=finite_problems(metrics))

    # --- the plan ----------------------------------------------------------------------------
    def label(self, model: Model, what: str, precision: str) -> str:
        """A row's name, e.g. 'SDXL epoch prdp fp16' ('fp16 (CPU runs fp32)' on the CPU)."""
        return f"{model.name} {what} {precision_label(self.config(model, precision), self.device)}"

    def run(self) -> Table:
        sd15, sdxl = self.sd15, self.sdxl
        low, high = TOY_STEPS if self.toy else REAL_STEPS
        memory = dict(prompts_per_epoch=1, images_per_prompt=2)
        self.group(sd15, "fp16", [
            (self.label(sd15, NEURAL_REWARD_ROW, "fp16"),
             lambda b: self.neural_reward_row(b, self.short(sd15, "fp16"))),
            (self.label(sd15, "epoch prdp", "fp16"), lambda b: self.epoch_row(sd15, b, self.config(sd15, "fp16"))),
            (self.label(sd15, "epoch ddpo", "fp16"), lambda b: self.ddpo_row(sd15, b, self.config(sd15, "fp16"))),
        ])
        self.group(sdxl, "fp16", [
            (self.label(sdxl, "epoch prdp", "fp16"), lambda b: self.epoch_row(sdxl, b, self.config(sdxl, "fp16"))),
            *[(self.label(sdxl, f"update memory T={steps}", "fp16"),
               lambda b, steps=steps: self.update_memory_row(b, self.config(sdxl, "fp16", **memory, steps=steps),
                                                             low, high))
              for steps in (low, high)],
        ])
        self.group(sd15, "bf16", [
            (self.label(sd15, "epoch prdp", "bf16"), lambda b: self.epoch_row(sd15, b, self.config(sd15, "bf16")))])
        self.group(sdxl, "bf16", [
            (self.label(sdxl, "epoch prdp", "bf16"), lambda b: self.epoch_row(sdxl, b, self.config(sdxl, "bf16")))])
        self.group(sd15, "no", [
            (self.label(sd15, "onpolicy (TF32 off)", "no"), lambda b: self.onpolicy_row(b, self.short(sd15, "no")))])
        return self.table


def print_sizes() -> None:
    for model in models(toy=False):
        counts = model.parameter_counts()
        print(f"{model.name}: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="toy sizes on the CPU (no GPU needed)")
    parser.add_argument("--sizes", action="store_true", help="print the real-size parameter counts and exit")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help="seconds after which no further row starts (the rest fail as not run)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.sizes:
        print_sizes()
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print(f"gpu_bench: torch {torch.__version__} (CUDA build {torch.version.cuda}) cannot use a GPU here: "
              "run benchmarks/gpu_check.sh for the reason, or pass --cpu for toy sizes", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"gpu_bench: {props.name}, torch {torch.__version__}, {apply_card_cap(device)}")
    else:
        print(f"gpu_bench: CPU, toy sizes, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="prdp-gpu-bench-") as scratch:
        check = Check(device, toy=args.cpu, deadline=args.deadline, scratch=Path(scratch))
        table = check.run()
    table.print()
    if args.json:
        table.write_json(args.json)
    print(f"\ngpu_bench: {len(table.rows)} rows, {table.failed} failed, "
          f"{time.perf_counter() - check.started:.0f} s in all")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
