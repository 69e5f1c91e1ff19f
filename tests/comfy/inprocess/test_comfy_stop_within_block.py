"""Stop within one model evaluation on ComfyUI's own UNet (issue 22.1), in-process: Stop pressed
while one block of a batched step computes takes effect before the next block, and the run
keeps its checkpoint."""
import threading

import torch

from comfy_inprocess import import_comfy, in_thread

import_comfy()

from comfyui_prdp.backends.base import block_modules  # noqa: E402
from comfyui_prdp.backends.comfyui.backend import ComfyBackend  # noqa: E402
from comfyui_prdp.config import TrainConfig  # noqa: E402
from comfyui_prdp.trainer import Trainer  # noqa: E402
from toy_backend import BrightnessReward  # noqa: E402


def test_stop_pressed_inside_a_unet_block_ends_the_run_before_the_next_block(sd15, tmp_path):
    model, clip, vae = sd15
    with torch.inference_mode():      # the node builds it in ComfyUI's worker thread
        backend = ComfyBackend(model, clip, vae, rank=2, seed=0)
    try:
        diffusion_model = backend.patcher.model.diffusion_model
        blocks = backend.stop_check_modules()
        assert blocks == block_modules(diffusion_model)
        first, last = diffusion_model.input_blocks[1][0], diffusion_model.output_blocks[-1][-1]   # layers
        assert first in blocks and last in blocks      # ComfyUI calls these, never their TimestepEmbedSequential
        stop = threading.Event()
        calls = {"first": 0, "last_after_stop": 0}

        def press_stop(module, args):
            calls["first"] += 1
            if calls["first"] == 3:       # calls 1-2: the cost probe (warm-up, timed); 3: the first sampling step
                stop.set()

        def count_last(module, args):
            calls["last_after_stop"] += stop.is_set()
        hooks = [first.register_forward_pre_hook(press_stop), last.register_forward_pre_hook(count_last)]
        config = TrainConfig().replace(epochs=2, prompts_per_epoch=2, images_per_prompt=2, steps=2, cfg=3.0,
                                       width=64, height=64, sample_batch_size=4, train_batch_size=4,
                                       lora_rank=2, seed=3).validate()
        try:
            result = in_thread(Trainer(backend, BrightnessReward(), ["a cat", "a dog"], config,
                                       out_dir=tmp_path / "run", stop_event=stop).run)
        finally:
            for hook in hooks:
                hook.remove()
        assert result.stopped and result.epochs_done == 0
        assert calls == {"first": 3, "last_after_stop": 0}
        assert result.checkpoint_path is not None and (result.checkpoint_path / "lora.safetensors").is_file()
    finally:
        backend.release()
