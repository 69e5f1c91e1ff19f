"""The policy update: K optimizer steps per epoch over prompt minibatches, each the exact
gradient in two passes (per-step weights without gradients, then micro-batched backward passes),
summed over ranks, clipped and (float16) loss-scaled."""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from ..backends.base import Backend
from ..objective import clip_fraction, logp_gradient_weights, pair_agreement
from ..runs import checkpoints
from ..runs.stop_signals import StopRequested
from ..sampling import index_cond, recorded_logprob
from .batches import EpochBatch, epoch_generator, micro_batches


def computes_in_float16(backend: Backend) -> bool:
    """Whether the backend's model computes in float16 (its `compute_dtype` where it declares
    one, e.g. a host that takes float32 inputs and casts them, else `dtype`): its gradients then
    need loss scaling. bfloat16 and float32 have float32's range and are left alone."""
    return getattr(backend, "compute_dtype", backend.dtype) == torch.float16


class PolicyUpdate:
    """Trainer's update phase (a mixin of Trainer)."""

    def update(self, batch: EpochBatch, epoch: int) -> dict:
        """K updates; each optimizer step uses one minibatch of prompt groups. Distributed,
        the minibatch is the same on every rank, each computes the gradient of its own groups'
        share of the loss, and one all-reduce per step sums them (see _sum_over_ranks)."""
        cfg = self.config
        N = len(batch.all_prompts)
        mine = range(batch.first_group, batch.first_group + len(batch.prompts))
        minibatch = cfg.minibatch_prompts or N
        generator = epoch_generator(cfg.seed, epoch, stream=1)
        on_policy = True            # theta == theta_old until the first optimizer step
        losses, clip_fracs, grad_norms, skipped = [], [], [], 0
        agreed, pairs = 0.0, 0.0          # pair_agreement over the epoch's updates (PRDP only)
        onpolicy_diff = float("nan")
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._faults.attempt(self.backend.prepare_for_training)
        for _ in range(cfg.updates_per_epoch):
            prompt_order = torch.randperm(N, generator=generator)
            for start in range(0, N, minibatch):
                train_steps = self._train_steps(generator, batch.traj.logp.shape[1])
                self.optimizer.zero_grad(set_to_none=True)
                groups = prompt_order[start:start + minibatch]
                local = groups[(groups >= mine.start) & (groups < mine.stop)] - mine.start
                share = len(local) / len(groups)     # the loss is a mean over the minibatch's groups
                stats = {"loss": 0.0, "clip_frac": 0.0, "onpolicy_max_diff": float("nan"), "agreed": 0.0, "pairs": 0}
                if len(local):      # (a rank that failed keeps the zero stats: this step's all-reduce ends the run)
                    stats = self._faults.attempt(self.minibatch_gradient, batch, local, train_steps, on_policy,
                                                 epoch, share) or stats
                if on_policy:
                    onpolicy_diff = stats["onpolicy_max_diff"]
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                loss, clip_frac, step_agreed, step_pairs = self._sum_over_ranks(
                    params, stats["loss"] * share, stats["clip_frac"] * share, stats["agreed"], stats["pairs"])
                agreed, pairs = agreed + step_agreed, pairs + step_pairs
                losses.append(loss)
                clip_fracs.append(clip_frac)
                grad_norm = self._faults.attempt(self._optimizer_step, params, epoch)
                if grad_norm is None and not self._faults.failed:     # a float16 step skipped: the
                    skipped += 1                                       # weights are unchanged, still on-policy
                else:
                    grad_norms.append(grad_norm)
                    on_policy = False
        onpolicy_diff, failed = self.dist.maxima(onpolicy_diff, float(self._faults.failed))
        self._faults.check(failed > 0)
        stats = {"loss": sum(losses) / len(losses), "clip_frac": sum(clip_fracs) / len(clip_fracs),
                 "onpolicy_max_diff": onpolicy_diff, "pair_agreement": agreed / pairs if pairs else float("nan"),
                 "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
                 "optimizer_steps": len(losses) - skipped}
        if self.loss_scale is not None:
            stats.update(skipped_steps=skipped, loss_scale=self.loss_scale.scale)
        return stats

    def _optimizer_step(self, params: List[torch.Tensor], epoch: int) -> Optional[float]:
        """Clip the (summed) gradient and step; returns the gradient norm before clipping, or
        None for a float16 step skipped because its scaled gradient overflowed (loss_scale).
        Two device-to-host syncs whatever the number of LoRA tensors: the norm before the step
        (a non-finite gradient must not reach the weights), their finiteness after it."""
        checkpoints.align_optimizer_state(self.optimizer)     # the LoRA may have moved since a resume
        if self.loss_scale is not None:
            self.loss_scale.unscale_(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip).item()
        if not math.isfinite(grad_norm):
            if self.loss_scale is not None and self.loss_scale.back_off():
                return None
            raise FloatingPointError(
                f"epoch {epoch + 1}: the LoRA gradient is not finite (norm {grad_norm}); the step was "
                "dropped and nothing was written. Lower the learning rate, raise beta, or train "
                "in float32 (mixed_precision 'no'); resume from the last checkpoint")
        self.optimizer.step()
        if not all_finite(params):
            raise FloatingPointError(
                f"epoch {epoch + 1}: an optimizer step made the LoRA weights non-finite; nothing was "
                "written. Lower the learning rate; resume from the last checkpoint")
        if self.loss_scale is not None:
            self.loss_scale.step_taken()
        return grad_norm

    def minibatch_gradient(self, batch: EpochBatch, groups: torch.Tensor, train_steps: torch.Tensor,
                           on_policy: bool, epoch: int, share: float = 1.0) -> dict:
        """Accumulate the exact gradient of `share` times the loss of prompt groups `groups`
        into .grad (share < 1: this rank's part of a minibatch's mean over groups).

        Pass 1 (no grad) gets the current log-probs (skipped when on_policy: they equal the
        recorded ones); the loss's derivative w.r.t. each log-prob gives per-step weights;
        pass 2 back-propagates sum(w * logp) one micro-batch at a time. With fewer train_steps
        than T the gradient is approximate (other steps keep their recorded values).
        """
        cfg = self.config
        B, T = cfg.images_per_prompt, batch.traj.logp.shape[1]    # T: the policy's trained steps
        G = len(groups)
        rows = (groups[:, None] * B + torch.arange(B)[None, :]).reshape(-1)   # [G*B], prompt-major
        logp_old = batch.traj.logp[rows]
        logp_ref = batch.logp_ref[rows]
        rewards = batch.rewards[rows].view(G, B)
        r_idx, t_idx = self._transitions(rows, train_steps)
        logp_now = logp_old.clone()
        if not on_policy:
            values = self._logprobs(batch, r_idx, t_idx, None, epoch, "update")
            logp_now[:, train_steps] = values.view(len(rows), len(train_steps))
        if cfg.algorithm == "ddpo":
            loss_kwargs = dict(clip_range=cfg.clip_range, adv_clip=cfg.adv_clip)
            if batch.advantages is not None:
                loss_kwargs["advantages"] = batch.advantages[rows].view(G, B)
        else:
            loss_kwargs = dict(beta=cfg.beta, clip_range=cfg.clip_range, step_reduce=cfg.step_reduce)
        loss, weights = logp_gradient_weights(self.loss_fn, logp_now.view(G, B, T), logp_old.view(G, B, T),
                                              logp_ref.view(G, B, T), rewards, **loss_kwargs)
        weights = weights.view(len(rows), T)[:, train_steps] * (T / len(train_steps)) * share
        flat_w = weights.reshape(-1)
        keep = torch.ones_like(flat_w, dtype=torch.bool) if on_policy else flat_w != 0
        recomputed = self._logprobs(batch, r_idx[keep], t_idx[keep], flat_w[keep], epoch, "update")
        stats = {"loss": loss.item(),
                 "clip_frac": clip_fraction(logp_now[:, train_steps], logp_old[:, train_steps],
                                            cfg.clip_range, cfg.algorithm),
                 "onpolicy_max_diff": float("nan"), "agreed": 0.0, "pairs": 0}
        if cfg.algorithm == "prdp":
            fraction, count = pair_agreement(logp_now.view(G, B, T), logp_ref.view(G, B, T), rewards, cfg.step_reduce)
            stats.update(agreed=fraction * count if count else 0.0, pairs=count)
        if on_policy and len(recomputed):
            stats["onpolicy_max_diff"] = (recomputed - batch.traj.logp[r_idx, t_idx]).abs().max().item()
        return stats

    def _sum_over_ranks(self, params: List[torch.Tensor], *numbers: float) -> List[float]:
        """Sum the LoRA gradients and `numbers` over ranks in one all-reduce per optimizer step,
        which also carries the stop and failure flags: a stop, or an error, on any rank ends
        every rank at this step. A single process returns `numbers` unchanged."""
        if not self.dist.enabled:
            return list(numbers)
        grads = [p.grad.reshape(-1).double() for p in params]
        extra = torch.tensor([*numbers, float(self.stop_event.is_set()), float(self._faults.failed)],
                             dtype=torch.float64, device=grads[0].device)
        packet = self.dist.sum_(torch.cat(grads + [extra]))
        self._faults.check(packet[-1].item() > 0)
        offset = 0
        for p in params:
            p.grad.copy_(packet[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()
        if packet[-2].item() > 0:
            self.stop_event.set()
            raise StopRequested()
        return packet[offset:-2].tolist()

    def _train_steps(self, generator: torch.Generator, T: int) -> torch.Tensor:
        """T: the trajectories' log-prob columns (the policy's stochastic steps)."""
        count = max(1, round(T * self.config.timestep_fraction))
        if count >= T:
            return torch.arange(T)
        return torch.randperm(T, generator=generator)[:count].sort().values

    @staticmethod
    def _transitions(rows: torch.Tensor, steps: torch.Tensor):
        """Flattened (row, step) index pairs, row-major."""
        return rows.repeat_interleave(len(steps)), steps.repeat(len(rows))

    def current_logprobs(self, batch: EpochBatch) -> torch.Tensor:
        """log-probs [rows, trained steps] of the batch's recorded transitions under the current
        weights (no gradients): after an update, compare with batch.traj.logp."""
        rows, steps = self._all_transitions(*batch.traj.logp.shape)
        return self._logprobs(batch, rows, steps, None, 0, "re-evaluation").view_as(batch.traj.logp)

    def _all_transitions(self, n_rows: int, n_columns: int):
        return self._transitions(torch.arange(n_rows), torch.arange(n_columns))

    def _logprobs(self, batch: EpochBatch, rows: torch.Tensor, steps: torch.Tensor,
                  grad_weights: Optional[torch.Tensor], epoch: int, phase: str) -> torch.Tensor:
        """log-probs (float64, CPU) of transitions (rows[k], steps[k]), evaluated in the sampling
        batches' layout (`micro_batches`). With grad_weights, also back-propagates
        sum(grad_weights * logp) into the LoRA (gradients accumulate; float16 models: times the
        loss scale). The values reach the CPU in one copy at the end."""
        cfg = self.config
        traj = batch.traj
        scale = None if grad_weights is None or self.loss_scale is None else self.loss_scale.scale
        values, places = [], []
        for index in micro_batches(rows, steps, cfg.sample_batch_size, cfg.train_batch_size):
            self._check_stop()
            r, s = rows[index], steps[index]
            args = (traj, r, s, index_cond(batch.cond, r), index_cond(batch.uncond, r))
            kwargs = dict(cfg=cfg.cfg, eta=cfg.eta, reduce=cfg.logprob_reduce)
            if grad_weights is None:
                with torch.no_grad():
                    logp = recorded_logprob(self.backend, *args, **kwargs)
            else:
                with torch.enable_grad():
                    logp = recorded_logprob(self.backend, *args, **kwargs)
                    w = grad_weights[index].to(logp.device)
                    if scale is not None:
                        w = w * scale      # a power of two: exact in float64
                    (w * logp).sum().backward()
                logp = logp.detach()
            values.append(logp)
            places.append(index)
            self._step(epoch, phase, len(index) * self._cfg_branches() * (1 if grad_weights is None else 3))
        out = torch.empty(len(rows), dtype=torch.float64)
        if values:
            out[torch.cat(places)] = torch.cat(values).cpu().double()
        return out

    @torch.no_grad()
    def reference_logprobs(self, batch: EpochBatch, epoch: int) -> torch.Tensor:
        """log-probs of every recorded transition under the base model (LoRA disabled), as a
        separate pass in training micro-batches. Training takes them from sampling instead
        (`sample_epoch`); this re-evaluation checks that they agree."""
        rows, steps = self._all_transitions(*batch.traj.logp.shape)
        with self.backend.adapters_disabled():
            values = self._logprobs(batch, rows, steps, grad_weights=None, epoch=epoch, phase="reference")
        return values.view_as(batch.traj.logp)


def all_finite(tensors: List[torch.Tensor]) -> bool:
    """Whether every element of `tensors` is finite, in one device-to-host sync (one inf-norm
    per tensor: NaN and inf propagate, finite values cannot overflow)."""
    maxima = torch._foreach_norm([t.detach() for t in tensors], math.inf)
    device = maxima[0].device           # factors ComfyUI left on another device (lowvram) join it
    return bool(torch.isfinite(torch.stack([m.to(device) for m in maxima])).all())
