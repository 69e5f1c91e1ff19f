"""Learning from a person's choices on the embedded default: a scripted chooser that prefers the
smaller JPEG of each pair (a full ranking of each prompt's images, smallest file first), answering
every ballot through the HTTP routes (fetching the PNGs the job wrote, posting the order), trains
the cpu-smoke run; the held-out images (the demo's 64: 4 unseen prompts x 16, each with its own
seed) must become more compressible clear of noise (paired t over the independent seeds).

A broken path fails it: answers ignored (equal rewards: no pairs, no change), the ranking read
backwards or the update's direction flipped (the held-out size grows). Measured (seed 0, ~150 s
on two CPU cores): compressibility -3.513 -> -3.407 (-kB), paired t = 6.00 over 64 seeds, 78 %
of the images smaller; with the ranking reversed (largest first) -3.513 -> -3.714, t = -8.07."""
import io

import torch
from PIL import Image

from comfyui_prdp.backends.diffusers_backend import DiffusersBackend
from comfyui_prdp.cli.settings import (DEFAULT_PROMPTS, HELD_OUT_FIRST_SEED, HELD_OUT_IMAGES_PER_PROMPT,
                                       HELD_OUT_PROMPTS)
from comfyui_prdp.config import preset
from comfyui_prdp.evaluation import distinct_seed_rows, paired_statistics, score_rows
from comfyui_prdp.models.embedded import build_embedded_pipeline
from comfyui_prdp.rewards import create_reward
from comfyui_prdp.rewards.human import HumanReward, read_preferences
from comfyui_prdp.service.jobs import JobRegistry
from comfyui_prdp.trainer import Trainer
from human_helpers import Server, chooser

MIN_PAIRED_T = 4.0


def jpeg_bytes(png: bytes) -> int:
    """The chooser's own measure: the size of the PNG's pixels saved as a quality-95 JPEG."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.tell()


def smallest_first(pngs):
    sizes = [jpeg_bytes(png) for png in pngs]
    return {"order": sorted(range(len(sizes)), key=lambda i: (sizes[i], i))}


def test_choosing_the_smaller_jpeg_through_the_routes_makes_held_out_images_more_compressible(tmp_path):
    torch.manual_seed(0)
    config = preset("cpu-smoke", seed=0)
    backend = DiffusersBackend.from_components(**build_embedded_pipeline(0), config=config)
    compressibility = create_reward("jpeg-compressibility")          # -kB
    rows = distinct_seed_rows(HELD_OUT_PROMPTS, HELD_OUT_IMAGES_PER_PROMPT, HELD_OUT_FIRST_SEED)
    before, _ = score_rows(backend, compressibility, *rows, config, lora=False)

    registry = JobRegistry()
    server = Server(registry)
    try:
        reward = HumanReward()
        job = registry.create(name="human-jpeg")
        trainer = Trainer(backend, reward, DEFAULT_PROMPTS, config, out_dir=tmp_path / "run",
                          callback=job.record, stop_event=job.stop_event)
        reward.attach_run(trainer, job)
        registry.launch(job, lambda job: trainer.run())
        answered = chooser(server.base, job, rule=smallest_first)
        assert job.wait(600) and job.error is None, job.error
    finally:
        server.close()
    assert [ballot["epoch"] for ballot in answered] == list(range(1, config.epochs + 1))
    assert len(read_preferences(tmp_path / "run")) == config.epochs * config.prompts_per_epoch

    after, _ = score_rows(backend, compressibility, *rows, config)
    stats = paired_statistics(before, after, rows[1])
    assert stats["n"] == len(rows[1]) == 64
    assert stats["paired_t"] >= MIN_PAIRED_T, (
        f"held-out JPEG compressibility {stats['mean_before']:.3f} -> {stats['mean_after']:.3f} "
        f"(-kB; paired t = {stats['paired_t']:.2f} over {stats['n']} seeds); expected t >= {MIN_PAIRED_T}")
