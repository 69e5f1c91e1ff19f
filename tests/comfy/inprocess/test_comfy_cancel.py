"""Cancel during training, in-process (issue 9.1), on whichever ComfyUI tree this process imports.

Since ComfyUI 2025-10-13 (after 0.3.64) every op checks the interrupt flag, so Cancel is raised inside the
training thread's model calls (and the flag is cleared there) instead of in the node's thread.
Either way the job must stop gracefully (the partial step dropped, a checkpoint written, the
job marked stopped), the node must end as interrupted, and no job may outlive its node.

The model calls are intercepted with a model function wrapper on the MODEL (the path
`calc_cond_batch` takes), once raising ComfyUI's InterruptProcessingException itself (what a
ComfyUI op raises), once setting the real flag with `interrupt_current_processing()`.
"""
import time

import pytest
import torch

from comfy_inprocess import comfy_dirs, import_comfy, load_plugin_package  # noqa: F401  (comfy_dirs: a fixture)

import_comfy()

import comfy.model_management  # noqa: E402
import comfy.utils  # noqa: E402

from comfyui_prdp.lora.files import load_lora  # noqa: E402

TINY = dict(prompts="a cat\na dog", negative_prompt="", preset="cpu-smoke", epochs=3, prompts_per_epoch=2,
            images_per_prompt=2, steps=2, cfg=3.0, beta=0.1, clip_range=0.01, updates_per_epoch=1,
            learning_rate=3e-3, lora_rank=2, width=64, height=64, seed=3, checkpoint_every=1)


@pytest.fixture(scope="module")
def plugin():
    return load_plugin_package()



class ModelCalls:
    """A model function wrapper counting the model calls with gradients on in runs (one run per
    optimizer step here: updates_per_epoch=1 and one minibatch), acting on one of them."""

    def __init__(self, act, run: int, call: int):
        self.act, self.target = act, (run, call)
        self.runs, self.in_run, self.last_grad = 0, 0, False
        self.lengths = {}
        self.acted_at = None

    def wrapper(self):
        """The function to install (ComfyUI deep-copies model options: a plain function survives
        that as itself, an object would be copied and count elsewhere)."""
        return lambda apply_model, args: self.call(apply_model, args)

    def call(self, apply_model, args):
        grad = torch.is_grad_enabled()
        if grad:
            if not self.last_grad:
                self.runs, self.in_run = self.runs + 1, 0
            self.in_run += 1
            self.lengths[self.runs] = self.in_run
        self.last_grad = grad
        if self.acted_at is None and (self.runs, self.in_run if grad else 0) == self.target:
            self.acted_at = time.monotonic()
            self.act()
        return apply_model(args["input"], args["timestep"], **args["c"])


def raise_interrupt():            # what a ComfyUI op raises when the flag is set
    raise comfy.model_management.InterruptProcessingException()


def set_interrupt_flag():         # what POST /interrupt does
    comfy.model_management.interrupt_current_processing(True)


def run_node(plugin, sd15, calls, **settings):
    model, clip, vae = sd15
    watched = model.clone()
    watched.set_model_unet_function_wrapper(calls.wrapper())
    nodes = plugin.NODE_CLASS_MAPPINGS
    with torch.inference_mode():       # as ComfyUI's worker thread runs every node
        reward, = nodes["PRDPLoadRewardModel"]().load("jpeg-incompressibility", "(auto)", "cpu", "auto")
        return nodes["PRDPTrainLoRA"]().train(watched, clip, vae, reward, **{**TINY, **settings}, unique_id="7")


def job_named(plugin, name):
    return [j for j in plugin.comfyui_prdp.service.jobs.JOBS.jobs() if j.name == name][-1]


def checkpoint_lora(comfy_dirs, name, folder):
    found = list((comfy_dirs / "output" / "prdp_runs").glob(f"{name}/checkpoints/{folder}"))
    assert len(found) == 1, f"expected one {folder} checkpoint, found {found}"
    return load_lora(found[0] / "lora.safetensors")[0]


def assert_clean_end(plugin, sd15, name):
    model = sd15[0]
    job = job_named(plugin, name)
    assert job.done and job.status == "stopped", (job.status, job.error)
    assert not comfy.model_management.processing_interrupted(), "the interrupt flag was left set"
    assert all(not getattr(m, "weight_function", None) and not getattr(m, "bias_function", None)
               for m in model.model.diffusion_model.modules()), "the backend's wrappers were left on the model"
    return job


@pytest.fixture()
def clean_flag():
    comfy.model_management.interrupt_current_processing(False)
    yield
    comfy.utils.set_progress_bar_global_hook(None)
    comfy.model_management.interrupt_current_processing(False)


def test_an_interrupt_raised_by_a_model_call_in_the_update_drops_the_partial_step(plugin, sd15, comfy_dirs, clean_flag):
    """Raised at the last model call of epoch 2's optimizer step: the stopped checkpoint holds
    exactly epoch 1's LoRA, and the node ends interrupted."""
    counter = ModelCalls(lambda: None, run=-1, call=-1)
    run_node(plugin, sd15, counter, lora_name="counted", epochs=1)
    grad_calls = counter.lengths[1]
    calls = ModelCalls(raise_interrupt, run=2, call=grad_calls)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_node(plugin, sd15, calls, lora_name="raised")
    assert calls.acted_at is not None
    job = assert_clean_end(plugin, sd15, "raised")
    assert len(job.metrics) == 1
    after_epoch_1 = checkpoint_lora(comfy_dirs, "raised", "epoch_00001")
    stopped = checkpoint_lora(comfy_dirs, "raised", "epoch_00001_stopped")
    assert stopped.keys() == after_epoch_1.keys() and len(stopped) > 0
    assert all(torch.equal(stopped[k], after_epoch_1[k]) for k in stopped), "the partial step was applied"


def test_an_interrupt_raised_while_sampling_keeps_the_untrained_lora(plugin, sd15, comfy_dirs, clean_flag):
    calls = ModelCalls(raise_interrupt, run=0, call=0)       # the first model call (sampling, no grad)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_node(plugin, sd15, calls, lora_name="early")
    job = assert_clean_end(plugin, sd15, "early")
    assert job.metrics == []
    state = checkpoint_lora(comfy_dirs, "early", "epoch_00000_stopped")
    downs = [v for k, v in state.items() if k.endswith("lora_down.weight")]
    assert downs and all(torch.count_nonzero(v) == 0 for v in downs)    # LoRA init: down = 0


def test_the_real_interrupt_flag_set_during_training_ends_the_node_interrupted(plugin, sd15, comfy_dirs, clean_flag):
    """ComfyUI after 0.3.64: the next op in the training thread raises (and clears the flag);
    0.3.64: the node's thread sees the flag. Both: interrupted within seconds, checkpoint kept."""
    calls = ModelCalls(set_interrupt_flag, run=2, call=1)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_node(plugin, sd15, calls, lora_name="flagged")
    stopped_after = time.monotonic() - calls.acted_at
    assert stopped_after < 30, f"the node took {stopped_after:.1f} s to stop"
    job = assert_clean_end(plugin, sd15, "flagged")
    assert len(job.metrics) == 1
    # the dashboard was told how the run ended (0.3.64: the node's thread left its wait on Cancel)
    assert job.outputs.get("message", "").startswith("stopped at epoch 1 of 3; LoRA: "), job.outputs
    after_epoch_1 = checkpoint_lora(comfy_dirs, "flagged", "epoch_00001")
    stopped = checkpoint_lora(comfy_dirs, "flagged", "epoch_00001_stopped")
    assert all(torch.equal(stopped[k], after_epoch_1[k]) for k in stopped)


def test_no_job_outlives_its_node_when_the_node_fails_while_waiting(plugin, sd15, comfy_dirs, clean_flag):
    """An error in the node's thread (here the progress hook) stops the job and waits for it."""
    def failing_hook(value, total, preview, prompt_id=None, node_id=None):
        raise RuntimeError("progress hook failed")

    comfy.utils.set_progress_bar_global_hook(failing_hook)
    with pytest.raises(RuntimeError, match="progress hook failed"):
        run_node(plugin, sd15, ModelCalls(lambda: None, run=-1, call=-1), lora_name="orphan", epochs=50)
    job = job_named(plugin, "orphan")
    assert job.done, "the node returned while its job was still running"
    assert job.status == "stopped" and len(job.metrics) < 50
