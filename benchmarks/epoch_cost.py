"""Cost of one PRDP epoch against its floor, measured in one run.

For the cpu-smoke preset on the embedded model it prints seconds per epoch by phase (sampling
includes the base model's reference log-probs at the visited latents), the number
of UNet evaluations (latents x CFG branches) per phase, and the floor: the time of the same
number of bare UNet forward (no grad) and forward+backward passes at the same batch sizes.
`--memory` also runs one update in fresh processes for two step counts T and prints the peak
resident memory of each (the two-pass gradient should make it independent of T). Last, the
same epochs with algorithm=ddpo and the PRDP/DDPO epoch-time ratio, whole and by phase.

    python benchmarks/epoch_cost.py [--epochs 2] [--memory]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfyui_prdp.backends.diffusers_backend import DiffusersBackend  # noqa: E402
from comfyui_prdp.config import preset  # noqa: E402
from comfyui_prdp.models.embedded import build_embedded_pipeline  # noqa: E402
from comfyui_prdp.rewards import create_reward  # noqa: E402
from comfyui_prdp.trainer import Trainer  # noqa: E402

PROMPTS = ["a painting of a cat", "a painting of a dog", "a painting of a fox", "a painting of an owl"]


class CountingBackend:
    """Wraps a backend's predict_eps to count evaluated latents by (phase, grad)."""

    def __init__(self, backend):
        self.backend = backend
        self.phase = "setup"
        self.counts = Counter()
        self.batch_sizes = Counter()
        original = backend.predict_eps

        def counted(x, t, cond):
            key = (self.phase, torch.is_grad_enabled())
            self.counts[key] += x.shape[0]
            self.batch_sizes[(key, x.shape[0])] += 1
            return original(x, t, cond)

        backend.predict_eps = counted

    def on_event(self, event):
        if event["type"] == "phase":
            self.phase = event["phase"]


def floor_seconds(backend, batch_sizes: Counter, latent_shape) -> float:
    """Time of the same bare UNet passes (same batch sizes, grad or not) outside the trainer."""
    unet = backend.unet
    cond = backend.encode_prompts(PROMPTS[:1])["context"]
    total = 0.0
    for ((phase, grad), batch), calls in batch_sizes.items():
        x = torch.randn(batch, *latent_shape)
        t = torch.full((batch,), 500)
        context = cond.expand(batch, *cond.shape[1:])
        start = time.perf_counter()
        for _ in range(calls):
            if grad:
                out = unet(x, t, encoder_hidden_states=context).sample
                out.float().pow(2).mean().backward()
            else:
                with torch.no_grad():
                    unet(x, t, encoder_hidden_states=context)
        total += time.perf_counter() - start
    return total


PHASES = ("sampling", "reward", "update")


def run_epochs(epochs: int, algorithm: str = "prdp"):
    """(config, backend, counter, last epoch's metrics) of a cpu-smoke run on the embedded model."""
    config = preset("cpu-smoke", epochs=epochs, algorithm=algorithm)
    backend = DiffusersBackend.from_components(**build_embedded_pipeline(0), config=config)
    counter = CountingBackend(backend)
    trainer = Trainer(backend, create_reward("jpeg-compressibility"), PROMPTS, config, callback=counter.on_event)
    result = trainer.run()
    return config, backend, counter, result.metrics[-1]


def ddpo_ratio_report(epochs: int, prdp_last: dict) -> None:
    """The same epochs with DDPO; PRDP/DDPO time of the last epoch, whole and by phase."""
    _, _, counter, ddpo_last = run_epochs(epochs, "ddpo")
    print("\nPRDP vs DDPO, last epoch (same preset, seed and prompts):")
    for phase in PHASES:
        prdp, ddpo = prdp_last[f"seconds_{phase}"], ddpo_last[f"seconds_{phase}"]
        print(f"  {phase:10s} prdp {prdp:8.3f}  ddpo {ddpo:8.3f}  ratio {prdp / max(ddpo, 1e-9):5.2f}")
    prdp_total = sum(prdp_last[f"seconds_{p}"] for p in PHASES)
    ddpo_total = sum(ddpo_last[f"seconds_{p}"] for p in PHASES)
    evaluations = sum(v for v in counter.counts.values()) // epochs
    print(f"  {'total':10s} prdp {prdp_total:8.3f}  ddpo {ddpo_total:8.3f}  ratio {prdp_total / ddpo_total:5.2f}"
          f"   (DDPO UNet evaluations per epoch: {evaluations})")


def epoch_report(epochs: int) -> dict:
    config, backend, counter, last = run_epochs(epochs)
    print(f"preset cpu-smoke: N={config.prompts_per_epoch} B={config.images_per_prompt} T={config.steps} "
          f"K={config.updates_per_epoch} cfg={config.cfg} {config.width}px, torch threads {torch.get_num_threads()}")
    print("\nseconds in the last epoch, by phase:")
    phase_total = 0.0
    for phase in PHASES:
        seconds = last[f"seconds_{phase}"]
        phase_total += seconds
        print(f"  {phase:10s} {seconds:8.3f}")
    print(f"  {'total':10s} {phase_total:8.3f}")
    per_epoch = Counter({k: v // epochs for k, v in counter.counts.items()})
    calls_per_epoch = Counter({k: max(1, v // epochs) for k, v in counter.batch_sizes.items()})
    print("\nUNet evaluations per epoch (latents x CFG branches):")
    for (phase, grad), count in sorted(per_epoch.items()):
        print(f"  {phase:10s} {'forward+backward' if grad else 'forward':17s} {count:6d}")
    print(f"  expected from the config: {config.model_evaluations_per_epoch()}")
    shape = tuple(backend.latent_shape(config.height, config.width))
    floor = floor_seconds(backend, calls_per_epoch, shape)
    model_phases = last["seconds_sampling"] + last["seconds_update"]
    print(f"\nfloor (bare UNet passes, same count and batch sizes): {floor:.3f} s")
    print(f"ratio sampling(+reference)+update / floor: {model_phases / floor:.2f}x")
    print(f"ratio whole epoch / floor:                    {phase_total / floor:.2f}x")
    return last


def memory_child(steps: int) -> None:
    config = preset("cpu-smoke", steps=steps, epochs=1, updates_per_epoch=1)
    backend = DiffusersBackend.from_components(**build_embedded_pipeline(0), config=config)
    trainer = Trainer(backend, create_reward("jpeg-compressibility"), PROMPTS, config)
    batch = trainer.sample_epoch(0)
    batch.rewards, _ = trainer.score(batch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.update(batch, 0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"steps": steps, "peak_rss_mb": after / 1024, "growth_in_update_mb": (after - before) / 1024}))


def memory_report() -> None:
    print("\npeak memory of one update, fresh process per T (two-pass gradient):")
    rows = []
    for steps in (8, 32):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(steps)], capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(f"  T={steps:3d}: peak RSS {rows[-1]['peak_rss_mb']:8.1f} MB, "
              f"growth during the update {rows[-1]['growth_in_update_mb']:7.1f} MB")
    print(f"  ratio of update growth T=32 / T=8: "
          f"{max(rows[1]['growth_in_update_mb'], 1e-3) / max(rows[0]['growth_in_update_mb'], 1e-3):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--memory-child", type=int, default=None)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    prdp_last = epoch_report(args.epochs)
    if args.memory:
        memory_report()
    ddpo_ratio_report(args.epochs, prdp_last)


if __name__ == "__main__":
    main()
