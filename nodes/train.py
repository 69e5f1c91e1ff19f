"""PRDP Train LoRA: reward finetuning of the connected MODEL's LoRA, in a background job."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import List

import torch

from ..comfyui_prdp.config import PRESETS
from ..comfyui_prdp.service.jobs import DELIVERED, FAILED, FINISHED, JOBS, STOPPED
from ..comfyui_prdp.models.families import comfy_model_family, training_size
from ..comfyui_prdp.prompts import read_prompt_file
from . import train_paths
from .common import CATEGORY, LORA_MODEL_TYPE, REWARD_TYPE, refuse, widget_problems, workflow_id
from .train_form import (DEFAULT_PRESET, DEFAULT_PROMPTS, LIMITS, MIN_SIZE, NATIVE_SIZE, PRESET_GUIDANCE,
                         build_config, config_summary, parse_prompts, validate_form)

logger = logging.getLogger(__name__)

FLOAT_NO_ROUND = {"round": False}
TITLE = "PRDP Train LoRA"


def _int(name, default, tooltip, step=1):
    minimum, maximum = LIMITS[name]
    return ("INT", {"default": default, "min": minimum, "max": maximum, "step": step, "tooltip": tooltip})


def _float(name, default, step, tooltip, exact=False):
    minimum, maximum = LIMITS[name]
    options = {"default": default, "min": minimum, "max": maximum, "step": step, "tooltip": tooltip}
    if exact:
        options.update(FLOAT_NO_ROUND)
    return ("FLOAT", options)


class PRDPTrainLoRA:
    DESCRIPTION = (
        "Online reward finetuning (PRDP, Deng et al. 2024) of a LoRA on the connected model. Each "
        "epoch samples images for some prompts, scores them with the reward model and updates the "
        "LoRA. Runs in the background with live progress and previews; Cancel stops after the "
        "current step and keeps a checkpoint. The LoRA is saved to models/loras/prdp/. Trains UNet "
        "models: SD1.x, SD2.x (including 768-v v-prediction), SDXL and its finetunes (Pony, Illustrious, "
        "NoobAI, v-prediction and zero-terminal-SNR ones too); flow-matching models (SD3/3.5, Flux, "
        "Qwen-Image, ...) train with the flow-SDE policy (presets consumer-gpu-flux / consumer-gpu-sd35); "
        "other model samplings (EDM, continuous v) are refused.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to finetune: SD1.x, SD2.x (eps or "
                                               "v-prediction), SDXL and finetunes, or a flow model (SD3/3.5, "
                                               "Flux, Qwen-Image, ...). It is not modified: the LoRA is "
                                               "trained on a copy."}),
                "clip": ("CLIP", {"tooltip": "The text encoder that belongs to the model."}),
                "vae": ("VAE", {"tooltip": "The VAE that belongs to the model (images go to the reward)."}),
                "reward_model": (REWARD_TYPE, {"tooltip": "What to maximise, from Load Reward Model (PRDP)."}),
                "prompts": ("STRING", {"multiline": True, "default": DEFAULT_PROMPTS,
                                       "tooltip": "Training prompts, one per line (lines starting with # "
                                                  "are skipped). Each epoch draws prompts_per_epoch of them."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "Negative prompt for classifier-free guidance."}),
                "preset": (list(PRESETS), {"default": DEFAULT_PRESET,
                                           "tooltip": "Settings for everything not on this node (optimizer, "
                                                      "batch sizes, precision). The values on the node override "
                                                      "the preset's."}),
                "epochs": _int("epochs", 50, "Training epochs (sample, score, update)."),
                "prompts_per_epoch": _int("prompts_per_epoch", 4, "Prompts drawn per epoch."),
                "images_per_prompt": _int("images_per_prompt", 4, "Images sampled per prompt (at least 2: PRDP "
                                                                   "compares images of the same prompt)."),
                "steps": _int("steps", 20, "Sampling steps of the training sampler (DDPM; flow models: the flow SDE)."),
                "cfg": _float("cfg", 5.0, 0.1, "Classifier-free guidance scale while training."),
                "beta": _float("beta", 3e-5, 1e-6, "KL weight: larger keeps the LoRA closer to the base "
                                                      "model (paper: 3e-5 small scale, 3e-6 large scale).", True),
                "clip_range": _float("clip_range", 1e-4, 1e-6, "Per-step clipping of the log-ratio (the "
                                                            "proximal update; paper: 1e-4).", True),
                "updates_per_epoch": _int("updates_per_epoch", 1, "Gradient updates per epoch on the same samples."),
                "learning_rate": _float("learning_rate", 3e-4, 1e-5, "AdamW learning rate of the LoRA.", True),
                "lora_rank": _int("lora_rank", 8, "LoRA rank (alpha = rank)."),
                "width": _int("width", NATIVE_SIZE, "Width of training images (a multiple of 8, at least "
                                                         f"{MIN_SIZE}). 0 (the default): the model's native size, "
                                                         "1024 for SDXL, 768 for SD2.x 768-v, 512 for SD1.x. "
                                                         "prompts x images x size is limited by the memory one "
                                                         "epoch needs.", 8),
                "height": _int("height", NATIVE_SIZE, "Height of training images (a multiple of 8, at least "
                                                           f"{MIN_SIZE}); 0 (the default): the model's native "
                                                           "size, as for width.", 8),
                "seed": ("INT", {"default": 0, "min": LIMITS["seed"][0], "max": LIMITS["seed"][1],
                                 "tooltip": "Seed of prompt order, noise and LoRA initialisation. The same "
                                            "seed and settings give the same run."}),
                "lora_name": ("STRING", {"default": "prdp_lora",
                                         "tooltip": "File name of the LoRA in models/loras/prdp/ (an existing "
                                                    "file is never replaced: a number is appended)."}),
            },
            "optional": {
                "prompt_file": (train_paths.prompt_file_choices(), {
                    "tooltip": "A prompt file in ComfyUI's input folder (or input/prompts/): .txt with one "
                               "prompt per line, .jsonl / .json with a 'prompt' (or 'caption', 'text') field, "
                               ".csv / .tsv with such a column; used together with 'prompts' (for large "
                               "prompt sets)."}),
                "checkpoint_every": _int("checkpoint_every", 0, "Save a checkpoint every n epochs (0: only at the end "
                                                       "or when stopped). Checkpoints go to output/prdp_runs/."),
                "resume_from": (train_paths.checkpoint_choices(), {
                    "tooltip": "Continue a run from one of its checkpoints (same model and lora_rank); "
                               "'epochs' is the total to reach."}),
                "algorithm": (["prdp", "ddpo"], {
                    "tooltip": "prdp (the paper's method) or ddpo (the baseline it improves on)."}),
                "flow_guidance": _float("flow_guidance", PRESET_GUIDANCE, 0.1,
                                        "Distilled guidance of guidance-distilled flow models (Flux.1-dev), "
                                        "given as conditioning as FluxGuidance does; train those with cfg 1. "
                                        "Other models ignore it. -1 (the default): the preset's value "
                                        "(consumer-gpu-flux: 3.5), else the model's own default."),
            },
            "hidden": {"unique_id": "UNIQUE_ID", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ("MODEL", LORA_MODEL_TYPE, "IMAGE")
    RETURN_NAMES = ("model", "lora", "reward_curve")
    OUTPUT_TOOLTIPS = ("The input model with the trained LoRA applied.",
                       "The trained LoRA (for Load LoRA Model, Save LoRA Weights or Apply LoRA (PRDP)).",
                       "Mean reward per epoch (with a ±std band).")
    FUNCTION = "train"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, prompts=None, negative_prompt=None, preset=DEFAULT_PRESET, epochs=None,
                        prompts_per_epoch=None, images_per_prompt=None, steps=None, cfg=None, beta=None,
                        clip_range=None, updates_per_epoch=None, learning_rate=None, lora_rank=None,
                        width=None, height=None, seed=None, lora_name=None, prompt_file=train_paths.NONE,
                        checkpoint_every=None, resume_from=train_paths.NONE, algorithm=None, flow_guidance=None):
        """True, or FormRefused listing every problem. Naming every widget here makes ComfyUI skip
        its own checks, so the declared kinds, choices and min/max are enforced here. None is a
        value fed by a link (unknown while validating) and is checked at run time."""
        values = {name: value for name, value in locals().items() if name != "cls"}
        bad = widget_problems(cls.INPUT_TYPES(), values)
        problems = list(bad.values())
        good = {name: (None if name in bad else value) for name, value in values.items()}
        if "preset" in bad:
            good["preset"] = DEFAULT_PRESET
        if good["lora_name"] is not None:
            name_error = train_paths.check_lora_name(train_paths.strip_extension(good["lora_name"]))
        else:
            name_error = None
        prompt_file_given = good["prompt_file"] not in (None, train_paths.NONE)
        if prompt_file_given:
            try:
                read_prompt_file(train_paths.resolve_prompt_file(good["prompt_file"]), name=good["prompt_file"])
            except (ValueError, OSError) as error:
                problems.append(str(error))
        widgets = {k: good[k] for k in ("epochs", "prompts_per_epoch", "images_per_prompt", "steps", "cfg",
                                        "beta", "clip_range", "updates_per_epoch", "learning_rate", "lora_rank",
                                        "width", "height", "seed", "negative_prompt", "checkpoint_every",
                                        "algorithm", "flow_guidance")}
        problems += validate_form(good["prompts"], prompt_file_given, good["preset"], name_error, **widgets)
        refuse(TITLE, problems)
        return True

    @classmethod
    def IS_CHANGED(cls, prompt_file=train_paths.NONE, **_):
        return train_paths.prompt_file_signature(prompt_file)

    def train(self, model, clip, vae, reward_model, prompts, negative_prompt, preset, epochs,
              prompts_per_epoch, images_per_prompt, steps, cfg, beta, clip_range, updates_per_epoch,
              learning_rate, lora_rank, width, height, seed, lora_name, prompt_file=train_paths.NONE,
              checkpoint_every=0, resume_from=train_paths.NONE, algorithm="prdp", flow_guidance=PRESET_GUIDANCE,
              unique_id=None, extra_pnginfo=None):
        import comfy.model_management  # ComfyUI only
        import comfy.sd

        from ..comfyui_prdp.backends.comfyui.conditioning import PROMPT_CACHE_SIZE
        from ..comfyui_prdp.backends.comfyui.backend import ComfyBackend, ModelInterrupted
        from ..comfyui_prdp.runs.plots import image_to_tensor, reward_curve
        from ..comfyui_prdp.trainer import Trainer
        from .train_progress import ComfyProgress, stop_and_wait, wait_for_job

        prompt_list = self._prompts(prompts, prompt_file)
        family = comfy_model_family(model)
        width, height = training_size(width, height, family)     # a side of 0 (the default): native size
        logger.info("PRDP: %s model, training at %dx%d", family.name, width, height)
        config = build_config(preset, epochs=epochs, prompts_per_epoch=prompts_per_epoch,
                              images_per_prompt=images_per_prompt, steps=steps, cfg=cfg, beta=beta,
                              clip_range=clip_range, updates_per_epoch=updates_per_epoch,
                              learning_rate=learning_rate, lora_rank=lora_rank, width=width, height=height,
                              seed=seed, negative_prompt=negative_prompt, checkpoint_every=checkpoint_every,
                              algorithm=algorithm, flow_guidance=flow_guidance)
        name = train_paths.strip_extension(lora_name)
        error = train_paths.check_lora_name(name)
        if error:
            raise ValueError(error)
        resume_path = train_paths.resolve_checkpoint(resume_from)
        if resume_path is not None:
            for note in train_paths.check_resume_settings(resume_path, config):
                logger.info("PRDP: resuming %s: %s", resume_from, note)
        lora_path = train_paths.lora_folder() / f"{name}.safetensors"

        job = JOBS.create(name=name, info={**config_summary(config, len(prompt_list)),
                                           "reward": getattr(reward_model, "name", "reward"), "node": unique_id,
                                           "workflow": workflow_id(extra_pnginfo)})
        progress = ComfyProgress(job, unique_id, config.epochs)    # the dashboard's Stop works from here on
        backend = None
        try:
            progress.preparing("copying the model for training")
            with torch.inference_mode(False):
                backend = ComfyBackend(model, clip, vae, rank=config.lora_rank, alpha=config.lora_alpha,
                                       targets=config.lora_targets, seed=config.seed, guidance=config.flow_guidance,
                                       gradient_checkpointing=config.gradient_checkpointing,
                                       mixed_precision=config.mixed_precision)
                # encode here: errors show before the job starts (skipped when Stop came already)
                if len(prompt_list) < PROMPT_CACHE_SIZE and not job.stop_requested:
                    progress.preparing(f"encoding {len(prompt_list)} prompt(s)")
                    backend.encode_prompts(prompt_list + [config.negative_prompt])
            run_dir = self._new_run_dir(name)
        except BaseException as error:
            if backend is not None:
                backend.release()
            cancelled = isinstance(error, (ModelInterrupted, comfy.model_management.InterruptProcessingException))
            JOBS.abandon(job, None if cancelled else error, STOPPED if cancelled else FAILED)
            progress.send_end(job.status)
            if isinstance(error, ModelInterrupted):    # Cancel raised in the text encoder's ops
                raise comfy.model_management.InterruptProcessingException() from None
            raise

        def run(job):
            trainer = Trainer(backend, reward_model, prompt_list, config, out_dir=run_dir,
                              callback=job.record, stop_event=job.stop_event, lora_path=lora_path)
            attach_run = getattr(reward_model, "attach_run", None)
            if callable(attach_run):      # the human reward: its ballots live in run_dir, asked via the job
                attach_run(trainer, job, resume_from=resume_path)   # the person's record comes along
            result = trainer.run(resume_from=resume_path)
            job.outputs.update({"lora": self._display_name(result.lora_path),
                                "checkpoint": str(result.checkpoint_path) if result.checkpoint_path else None,
                                "run_dir": run_dir.name})
            return result

        JOBS.launch(job, run)
        try:
            wait_for_job(job, progress)
        finally:
            stop_and_wait(job)        # no job outlives its node (a no-op once it has ended)
            backend.release()
        if backend.interrupted or isinstance(job.exception, comfy.model_management.InterruptProcessingException):
            # Cancel was raised inside the job's model calls (ComfyUI after 0.3.64 checks it in every
            # op, and clears the flag there): the job stopped gracefully; end the node interrupted.
            raise comfy.model_management.InterruptProcessingException()
        if job.exception is not None:
            raise RuntimeError(f"PRDP training failed: {job.error}") from job.exception
        result = job.result
        if result.epochs_done == 0:     # stopped before epoch 1 ended: no LoRA, nothing to compare
            logger.info("PRDP: %s stopped before its first epoch finished: nothing was trained", name)
            raise comfy.model_management.InterruptProcessingException()

        lora = backend.lora_model()
        model_out = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)[0]
        curve = image_to_tensor(reward_curve(result.metrics, title=f"{name}: reward per epoch (mean ± std)"))
        text = self._summary(result, name, config.epochs)
        logger.info("PRDP: %s", text.replace("\n", "; "))
        job.outputs[DELIVERED] = True       # these outputs may come back from ComfyUI's cache
        return {"ui": {"text": [text]}, "result": (model_out, lora, curve)}

    # --- helpers -------------------------------------------------------------------------
    @staticmethod
    def _prompts(prompts: str, prompt_file: str) -> List[str]:
        prompt_list = parse_prompts(prompts)
        path = train_paths.resolve_prompt_file(prompt_file)
        if path is not None:
            prompt_list += read_prompt_file(path, name=prompt_file)
        if not prompt_list:
            raise ValueError("no prompts: write at least one prompt (one per line) or choose a prompt_file")
        return prompt_list

    @staticmethod
    def _new_run_dir(name: str) -> Path:
        from ..comfyui_prdp.lora.files import unique_path

        root = train_paths.runs_folder()
        root.mkdir(parents=True, exist_ok=True)
        target = unique_path(root / name)
        target.mkdir(parents=True)
        return target

    @staticmethod
    def _display_name(path) -> str:
        if path is None:
            return ""
        try:
            return Path(path).relative_to(train_paths.lora_folder().parent).as_posix()
        except ValueError:
            return str(path)

    def _summary(self, result, name: str, epochs: int) -> str:
        """The node's final text, one fact per line: how the run ended, the reward, the LoRA."""
        from .train_progress import end_message

        lora = self._display_name(result.lora_path)
        lines = [f"{name}: " + end_message(STOPPED if result.stopped else FINISHED, result.epochs_done, epochs)]
        if result.metrics:
            first, last = result.metrics[0]["reward_mean"], result.metrics[-1]["reward_mean"]
            if all(map(math.isfinite, (first, last))):
                lines.append(f"reward {first:.4g} -> {last:.4g} ({last - first:+.3g})")
        lines.append(f"LoRA: {lora}" if lora else "no LoRA written")
        return "\n".join(lines)
