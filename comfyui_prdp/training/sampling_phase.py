"""The epoch's sampling and scoring: the prompts drawn, trajectories sampled with the
current weights (and the base model's log-probs), images decoded and scored, rewards checked."""
from __future__ import annotations

from typing import List

import torch

from ..policies import policy_for
from ..rewards.base import reward_device_bytes
from ..sampling import (Trajectories, broadcast_row, index_cond, join_trajectories, repeat_cond,
                        sample_trajectories)
from .batches import EpochBatch, epoch_generator, trajectory_generators


class EpochSampling:
    """Trainer's sampling and scoring phase (a mixin of Trainer)."""

    def sample_epoch(self, epoch: int) -> EpochBatch:
        cfg = self.config
        B = cfg.images_per_prompt
        groups = self.dist.shard(cfg.prompts_per_epoch)     # this rank's prompt groups (all of them alone)
        total, most_rows = len(groups) * B, max(self.dist.shard_sizes(cfg.prompts_per_epoch)) * B
        inputs = self._faults.attempt(self._sampling_inputs, epoch, groups)
        if not self._estimated:
            self._estimated = True
            self._faults.attempt(self._announce_epoch_estimate, epoch, inputs)
        chunks = []
        for start in range(0, most_rows, cfg.sample_batch_size):
            self._sync_stop()       # every rank passes here as often as the one with the most rows
            if start < total:
                chunks.append(self._faults.attempt(self._sample_rows, epoch, inputs, start))
        return self._faults.attempt(self._epoch_batch, inputs, chunks, groups.start)

    def _sampling_inputs(self, epoch: int, groups: range) -> tuple:
        """(the epoch's prompts, this rank's prompts, cond, uncond, one generator per trajectory)."""
        cfg = self.config
        generator = epoch_generator(cfg.seed, epoch)
        if cfg.prompts_per_epoch <= len(self.prompts):
            order = torch.randperm(len(self.prompts), generator=generator)[: cfg.prompts_per_epoch]
        else:
            order = torch.randint(len(self.prompts), (cfg.prompts_per_epoch,), generator=generator)
        epoch_prompts = [self.prompts[i] for i in order.tolist()]
        prompts = epoch_prompts[groups.start:groups.stop]
        B = cfg.images_per_prompt
        noise = trajectory_generators(cfg.seed, epoch, range(groups.start * B, groups.stop * B))
        self.backend.prepare_for_sampling()
        cond = repeat_cond(self.backend.encode_prompts(prompts), B)
        uncond = broadcast_row(self._negative_cond(), len(prompts) * B)
        return epoch_prompts, prompts, cond, uncond, noise

    def _sample_rows(self, epoch: int, inputs: tuple, start: int) -> Trajectories:
        """Trajectories of this rank's rows start ... start + sample_batch_size."""
        cfg = self.config
        _, prompts, cond, uncond, noise = inputs
        rows = torch.arange(start, min(len(prompts) * cfg.images_per_prompt, start + cfg.sample_batch_size))
        return sample_trajectories(
            self.backend, index_cond(cond, rows), index_cond(uncond, rows), steps=cfg.steps,
            cfg=cfg.cfg, policy=policy_for(cfg, self.backend), latent_shape=self.latent_shape,
            generator=noise[rows[0]:rows[-1] + 1],
            reduce=cfg.logprob_reduce, with_reference=True,
            on_step=lambda i, n: self._step(epoch, "sampling", len(rows) * self._cfg_branches() * (
                2 if i - 1 in self._trained_step_indices() else 1)))     # 2: and the base model's, at a trained step

    @staticmethod
    def _epoch_batch(inputs: tuple, chunks: List[Trajectories], first_group: int) -> EpochBatch:
        epoch_prompts, prompts, cond, uncond, _ = inputs
        traj = join_trajectories(chunks)
        return EpochBatch(prompts, cond, uncond, traj, logp_ref=traj.logp_ref,
                          rewards=torch.empty(0), images=torch.empty(0), first_group=first_group,
                          epoch_prompts=epoch_prompts)

    def score(self, batch: EpochBatch):
        cfg = self.config
        images = []
        with torch.no_grad():
            for start in range(0, len(batch.traj.final), cfg.sample_batch_size):
                self._check_stop()      # decoding a big batch at a big size takes a while too
                latents = batch.traj.final[start:start + cfg.sample_batch_size].to(self.backend.device)
                images.append(self.backend.decode(latents).float().cpu())
        batch.images = torch.cat(images)
        if not torch.isfinite(batch.images).all():
            raise RuntimeError("the decoded images contain NaN/inf: the model diverged or computes in a "
                               "precision that overflows (try mixed_precision 'no' or 'bf16', or a lower "
                               "learning rate); nothing was trained on them")
        row_prompts = batch.row_prompts
        self.backend.prepare_for_scoring(reward_device_bytes(self.reward))
        self.reward.prepare()
        try:
            with torch.no_grad():
                rewards, components = self.reward.score_with_components(batch.images, row_prompts)
        finally:
            self.reward.offload()
        name = getattr(self.reward, "name", type(self.reward).__name__)
        if not isinstance(rewards, torch.Tensor) or tuple(rewards.shape) != (len(row_prompts),):
            got = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
            raise RuntimeError(f"reward {name!r} returned {got}; expected a tensor of shape "
                               f"({len(row_prompts)},), one score per image")
        rewards = rewards.detach().float().cpu()
        if not torch.isfinite(rewards).all():
            raise RuntimeError(f"reward {name!r} returned non-finite values: {rewards.tolist()}")
        return rewards, {k: v.detach().float().cpu() for k, v in components.items()}

    def _negative_cond(self):
        if self._uncond_one is None:
            self._uncond_one = self.backend.encode_prompts([self.config.negative_prompt])
        return self._uncond_one
