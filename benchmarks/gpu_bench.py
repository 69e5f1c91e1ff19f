"""GPU benchmark of PRDP training at real model sizes (issue 13.4), one table.

Random-weight models of the real sizes, built from configs on the device (nothing is
downloaded): SD1.5 (UNet 860M, CLIP-L) at 512 px with the consumer-gpu preset and SDXL (UNet
2.6B, CLIP-L + OpenCLIP bigG) at 1024 px with consumer-gpu-sdxl, through the diffusers backend,
JPEG-compressibility reward (no weights). Rows:

* epoch    seconds per epoch by phase (sampling incl. the reference log-probs, reward, update)
           and torch.cuda.max_memory_allocated over the epoch, for each model (PRDP);
* ddpo     the same epoch with algorithm=ddpo, and the PRDP/DDPO epoch-time ratio;
* onpolicy the trainer's on-policy check (recomputed minus recorded log-prob, max |diff|) with
           mixed precision fp16 and bf16 against fp32 (no autocast, TF32 off);
* T=..     peak memory of the update phase at two step counts (the two-pass gradient keeps
           it flat: the ratio should be ~1).

Random weights draw noise, so rewards mean nothing here: the table is about time and memory.
On CUDA each measured epoch follows a warm-up epoch of the same model. A row that fails (e.g. a
non-finite value) is reported as such and the rest still runs.

    python benchmarks/gpu_bench.py                 (needs CUDA; about 3-4 minutes on an H100/H200)
    python benchmarks/gpu_bench.py --cpu           (toy sizes on the CPU: tries the script out)
    python benchmarks/gpu_bench.py --sizes         (parameter counts of the real-size configs, on meta)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfyui_prdp.config import TrainConfig, preset  # noqa: E402
from comfyui_prdp.embedded import SCHEDULER_CONFIG  # noqa: E402

PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a fox", "a photo of an owl",
           "a painting of a horse", "a painting of a rabbit"]

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


class Model:
    """One benchmarked model: how to build its backend components, and its preset."""

    def __init__(self, name: str, preset_name: str, unet: dict, text: List[dict], vae: dict, sdxl: bool):
        self.name, self.preset_name, self.unet, self.text, self.vae, self.sdxl = \
            name, preset_name, unet, text, vae, sdxl

    def components(self, device: torch.device, seed: int = 0) -> Dict[str, object]:
        """Random-weight components, created directly on `device` (fast for billions of weights)."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from comfyui_prdp.tokenizer_offline import offline_clip_tokenizer

        torch.manual_seed(seed)
        with torch.device(device):
            parts = {"unet": UNet2DConditionModel(**self.unet), "vae": AutoencoderKL(**self.vae),
                     "text_encoder": CLIPTextModel(CLIPTextConfig(**self.text[0]))}
            if self.sdxl:
                parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**self.text[1]))
        parts = {k: v.eval() for k, v in parts.items()}
        parts["tokenizer"] = offline_clip_tokenizer()
        if self.sdxl:
            parts["tokenizer_2"] = offline_clip_tokenizer()
        parts["scheduler"] = DDIMScheduler(**SCHEDULER_CONFIG)
        return parts

    def backend(self, config: TrainConfig, device: torch.device):
        from comfyui_prdp.backends.diffusers_backend import DiffusersBackend
        from comfyui_prdp.backends.diffusers_sdxl import DiffusersSDXLBackend

        cls = DiffusersSDXLBackend if self.sdxl else DiffusersBackend
        return cls(**self.components(device), config=config, device=device, model_name=self.name)

    def parameter_counts(self) -> Dict[str, int]:
        """Parameters of each component, counted on the meta device (no memory)."""
        with torch.device("meta"):
            parts = self.components(torch.device("meta"))
        return {k: sum(p.numel() for p in v.parameters()) for k, v in parts.items() if hasattr(v, "parameters")}


def models(toy: bool) -> List[Model]:
    if toy:
        return [Model("SD1.5 (toy)", "consumer-gpu", TOY_SD15_UNET, [TOY_CLIP], TOY_VAE, False),
                Model("SDXL (toy)", "consumer-gpu-sdxl", TOY_SDXL_UNET, [TOY_CLIP, TOY_CLIP], TOY_VAE, True)]
    return [Model("SD1.5", "consumer-gpu", SD15_UNET, [CLIP_L], SD_VAE, False),
            Model("SDXL", "consumer-gpu-sdxl", SDXL_UNET, [CLIP_L, CLIP_BIG_G], dict(SD_VAE, scaling_factor=0.13025),
                  True)]


# --- measuring ---------------------------------------------------------------------------
class PeakMemory:
    """Trainer callback: torch.cuda.max_memory_allocated of the last epoch, and of its update
    phase alone (None on the CPU)."""

    def __init__(self, device: torch.device, measured_epoch: int):
        self.cuda = device.type == "cuda"
        self.measured_epoch = measured_epoch
        self.epoch_peak: Optional[int] = None
        self.update_peak: Optional[int] = None

    def __call__(self, event: dict) -> None:
        if not self.cuda or event.get("epoch") != self.measured_epoch:
            return
        if event["type"] == "phase" and event["phase"] == "sampling":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif event["type"] == "phase" and event["phase"] == "update":
            torch.cuda.synchronize()
            self.epoch_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        elif event["type"] == "epoch":
            torch.cuda.synchronize()
            self.update_peak = torch.cuda.max_memory_allocated()
            self.epoch_peak = max(self.epoch_peak or 0, self.update_peak)


def run_epochs(backend, config: TrainConfig, device: torch.device) -> dict:
    """A warm-up epoch (on CUDA) then the measured one; its metrics and peak memory."""
    from comfyui_prdp.rewards import create_reward
    from comfyui_prdp.trainer import Trainer

    epochs = 2 if device.type == "cuda" else 1
    config = config.replace(epochs=epochs)
    memory = PeakMemory(device, measured_epoch=epochs)
    trainer = Trainer(backend, create_reward("jpeg-compressibility"), PROMPTS, config, callback=memory)
    result = trainer.run()
    metrics = dict(result.metrics[-1])
    metrics["peak_bytes"], metrics["update_peak_bytes"] = memory.epoch_peak, memory.update_peak
    return metrics


class Table:
    def __init__(self):
        self.rows: List[List[str]] = []

    def add(self, *cells) -> None:
        self.rows.append([str(c) for c in cells])
        print("  " + " | ".join(self.rows[-1]), flush=True)     # as it comes, in case a later row hangs

    def print(self, header: List[str]) -> None:
        rows = [header] + self.rows
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        print("\n" + line(header))
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in self.rows:
            print(line(row))


def gib(n: Optional[int]) -> str:
    return "n/a (CPU)" if n is None else f"{n / 2 ** 30:.2f} GiB"


def seconds(metrics: dict) -> str:
    parts = [f"{phase} {metrics[f'seconds_{phase}']:.2f}" for phase in ("sampling", "reward", "update")]
    total = sum(metrics[f"seconds_{phase}"] for phase in ("sampling", "reward", "update"))
    return f"{total:.2f} s ({', '.join(parts)})"


def guarded(table: Table, label: str, body: Callable[[], None]) -> None:
    """Run one measurement; a failure becomes a row instead of ending the benchmark."""
    try:
        body()
    except Exception as error:  # noqa: BLE001  (reported in the table)
        table.add(label, "FAILED", f"{type(error).__name__}: {str(error).splitlines()[0][:160]}", "", "")
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def precision_label(config: TrainConfig, device: torch.device) -> str:
    label = "fp32" if config.mixed_precision == "no" else config.mixed_precision
    return label if device.type == "cuda" or label == "fp32" else f"{label} (CPU runs fp32)"


def benchmark(device: torch.device, toy: bool) -> Table:
    table = Table()
    steps_low, steps_high = TOY_STEPS if toy else REAL_STEPS
    sd15, sdxl = models(toy)
    overrides = TOY_RUN if toy else {}
    for model in (sd15, sdxl):
        config = preset(model.preset_name, **overrides)
        size = f"{config.width}px N={config.prompts_per_epoch} B={config.images_per_prompt} T={config.steps}"

        def epoch_rows(model=model, config=config, size=size):
            backend = model.backend(config, device)
            try:
                prdp = run_epochs(backend, config, device)
                table.add(f"{model.name} epoch (prdp, {precision_label(config, device)})", size, seconds(prdp),
                          gib(prdp["peak_bytes"]), f"onpolicy {prdp['onpolicy_max_diff']:.2e}")
                if model is sd15:      # DDPO on the cheaper model (the ratio is the model's cost ratio)
                    ddpo = run_epochs(backend, config.replace(algorithm="ddpo"), device)
                    ratio = (sum(prdp[f"seconds_{p}"] for p in ("sampling", "reward", "update"))
                             / sum(ddpo[f"seconds_{p}"] for p in ("sampling", "reward", "update")))
                    table.add(f"{model.name} epoch (ddpo, {precision_label(config, device)})", size, seconds(ddpo),
                              gib(ddpo["peak_bytes"]), f"PRDP/DDPO epoch time {ratio:.2f}")
            finally:
                del backend
        guarded(table, f"{model.name} epoch", epoch_rows)

    # on-policy check by precision (SD1.5, short run); fp32 with TF32 off is the reference
    short = dict(prompts_per_epoch=1, images_per_prompt=2, steps=min(10, steps_low), sample_batch_size=2,
                 train_batch_size=2)
    for precision in ("no", "fp16", "bf16"):
        def precision_row(precision=precision):
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            config = preset(sd15.preset_name, **{**overrides, **short, "mixed_precision": precision})
            backend = sd15.backend(config, device)
            metrics = run_epochs(backend, config, device)
            table.add(f"{sd15.name} onpolicy {precision_label(config, device)}", f"T={config.steps}", seconds(metrics),
                      gib(metrics["peak_bytes"]), f"onpolicy max abs diff {metrics['onpolicy_max_diff']:.2e}")
        guarded(table, f"{sd15.name} onpolicy {precision}", precision_row)

    # update-phase peak memory against T (SDXL, one prompt x 2 images)
    peaks = {}
    for steps in (steps_low, steps_high):
        def memory_row(steps=steps):
            config = preset(sdxl.preset_name, **{**overrides, "prompts_per_epoch": 1, "images_per_prompt": 2,
                                                 "steps": steps})
            backend = sdxl.backend(config, device)
            metrics = run_epochs(backend, config, device)
            peaks[steps] = metrics["update_peak_bytes"]
            flat = ""
            if len(peaks) == 2 and all(peaks.values()):
                flat = f"update peak T={steps_high}/T={steps_low}: {peaks[steps_high] / peaks[steps_low]:.3f}"
            table.add(f"{sdxl.name} memory T={steps}", f"{config.width}px N=1 B=2", seconds(metrics),
                      gib(metrics["update_peak_bytes"]) + " (update)", flat)
        guarded(table, f"{sdxl.name} memory T={steps}", memory_row)
    return table


def print_sizes() -> None:
    for model in models(toy=False):
        counts = model.parameter_counts()
        print(f"{model.name}: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="toy sizes on the CPU (no GPU needed)")
    parser.add_argument("--sizes", action="store_true", help="print the real-size parameter counts and exit")
    args = parser.parse_args(argv)
    if args.sizes:
        print_sizes()
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU visible to torch: run on a GPU, or pass --cpu for toy sizes", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"gpu_bench: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB, torch {torch.__version__}")
    else:
        print(f"gpu_bench: CPU, toy sizes, {torch.get_num_threads()} threads, torch {torch.__version__}")
    started = time.perf_counter()
    table = benchmark(device, toy=args.cpu)
    table.print(["run", "size", "seconds per epoch (by phase)", "peak memory", "note"])
    failed = sum(row[1] == "FAILED" for row in table.rows)
    print(f"\ngpu_bench: {len(table.rows)} rows, {failed} failed, {time.perf_counter() - started:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
