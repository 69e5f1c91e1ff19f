"""One training run in a claimed --out: load the reward and the model, evaluate before, train,
evaluate after, and report (progress lines, reward_curve.png, before_after.png)."""
from __future__ import annotations

import math
import sys
import time
import traceback
from typing import List, Optional, Sequence

from ..config import TrainConfig
from ..progress import format_duration
from ..prompts import PromptTextError
from ..runs.stop_signals import stop_requests
from .settings import (GRID_IMAGES_PER_PROMPT, HELD_OUT_FIRST_SEED, HELD_OUT_IMAGES_PER_PROMPT, HELD_OUT_PROMPTS,
                       read_prompts)

def held_out_error(metrics: dict) -> str:
    """' ± 0.0123 (standard error, n = 8 images, each with its own seed)' from an evaluation's
    eval/reward_std (over the images) and eval/n; '' when either is missing."""
    n, std = metrics.get("eval/n"), metrics.get("eval/reward_std")
    if not n or std is None:
        return ""
    error = f"{std / math.sqrt(n - 1):.4f}" if n > 1 else "n/a"
    return f" ± {error} (standard error, n = {n} images, each with its own seed)"


class ProgressPrinter:
    """A tqdm bar over the whole run plus one line of metrics per epoch."""

    def __init__(self, epochs: int, enabled: bool = True):
        from tqdm.auto import tqdm
        self.enabled = enabled      # off on the ranks > 0 of a distributed run
        self.bar = tqdm(total=1000, desc="PRDP", unit="‰", bar_format="{l_bar}{bar}| {elapsed}<{remaining}",
                        file=sys.stderr, disable=not enabled)

    def __call__(self, event: dict) -> None:
        if not self.enabled:
            return
        if event["type"] == "step":
            self.bar.n = int(event["progress"] * 1000)
            self.bar.set_description(f"PRDP epoch {event['epoch']} {event['phase']}")
            self.bar.refresh()
        elif event["type"] == "phase":        # e.g. the held-out evaluation's progress (heldout.py)
            self.bar.set_description(f"PRDP epoch {event['epoch']} {event['phase']}")
            self.bar.refresh()
        elif event["type"] == "epoch":
            m = event["metrics"]
            self.bar.write(f"epoch {m['epoch']:4d}  reward {m['reward_mean']:+.4f} ± {m['reward_std']:.4f}  "
                           f"loss {m['loss']:.4g}  clip {m['clip_frac']:.3f}  kl {m['kl']:.4g}  "
                           f"on-policy diff {m['onpolicy_max_diff']:.1e}")
        elif event["type"] == "estimate":
            self.bar.write(f"estimated cost: ~{format_duration(event['epoch_seconds'])} per epoch "
                           f"({event['evaluations_per_epoch']} model evaluations of one image, "
                           f"{event['seconds_per_evaluation']:.2g} s each, measured once; batching makes it faster)")
        elif event["type"] == "checkpoint":
            self.bar.write(f"checkpoint: {event['path']}")
        elif event["type"] == "eval":
            m = event["metrics"]
            self.bar.write(f"held-out after epoch {event['epoch']}: reward {m['eval/reward_mean']:+.4f}"
                           + held_out_error(m) + " "
                           f"(best {m['eval/best_reward_mean']:+.4f} at epoch {m['eval/best_epoch']}"
                           + (f", {m['eval/divergence_strikes']} diverging" if m['eval/divergence_strikes'] else "")
                           + ")")
        elif event["type"] == "done" and event.get("early_stopped"):
            self.bar.close()
            print(f"early stop after epoch {event['epochs']}: the held-out reward fell while the training "
                  "reward rose (best LoRA in best/)", file=sys.stderr)
        elif event["type"] == "done":
            self.bar.n = 1000 if not event["stopped"] else self.bar.n
            self.bar.close()


class LoadRefused(Exception):
    """A refusal (one 'error: ...' line) while loading, kept by a distributed rank (RankFaults)."""


def _refusal_kept(work):
    """`work` with its SystemExit refusals raised as LoadRefused, an exception RankFaults keeps
    (a single process keeps its plain SystemExit: one 'error: ...' line)."""
    def run(*args, **kwargs):
        try:
            return work(*args, **kwargs)
        except SystemExit as refusal:
            if not isinstance(refusal.code, str):
                raise
            raise LoadRefused(refusal.code[len("error: "):] if refusal.code.startswith("error: ") else refusal.code) \
                from None
    return run


def _load_reward_and_model(args, config: TrainConfig):
    """(reward, backend) of this run; a refused one ends the command with one 'error: ...' line."""
    import torch

    from ..models.loading import load_backend
    from ..policies import policy_for
    from ..progress import timed_phase
    from .reward import make_reward     # looked up per run (tests put a stub there)

    with timed_phase(f"loading the reward {args.reward!r}"):
        reward = make_reward(args)
    torch.manual_seed(config.seed)    # the LoRA's initial weights derive from the seed (every rank alike)
    try:
        with timed_phase(f"loading the model {args.base or 'embedded-tiny-sd'}"):
            backend = load_backend(args.base, config, device=args.device, base_config=args.base_config)
        policy_for(config, backend)       # --policy against the model (ddpm on a flow model: one line)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise SystemExit(f"error: {error}")
    return reward, backend


def run_training(args, config: TrainConfig, prompts: List[str], checkpoint, dist=None) -> int:
    """Load, evaluate, train (from `checkpoint`, a CheckpointData or path, when given) and
    report, in a claimed --out. `dist`: this rank of a distributed run (rank 0 reports)."""
    from ..distributed.group import SINGLE
    from ..runs.plots import comparison_grid, reward_curve
    from ..distributed.faults import RankFailed, RankFaults
    from ..rewards.remote import RewardServerError
    from ..trainer import Trainer

    dist = dist or SINGLE
    evaluate = not args.no_eval and dist.is_main
    faults = RankFaults(dist)     # distributed: rank 0's evaluation error ends every rank (distributed/faults.py)
    prompts, held_out = split_held_out(args, config, prompts)   # before any model loads
    if held_out is not None and args.eval_prompts_file:
        from ..heldout import shared_prompts
        shared = shared_prompts(prompts, held_out)
        if shared:
            print(f"note: {shared} training prompt(s) are also in {args.eval_prompts_file}: the held-out reward is "
                  "not only on unseen prompts", file=sys.stderr)
    try:
        # distributed: a rank that cannot load (a file missing on its node, out of memory on its
        # GPU, its reward server refusing) ends every rank here, instead of leaving them waiting
        faults.phase = "loading the model and the reward"
        load = _refusal_kept(_load_reward_and_model) if dist.enabled else _load_reward_and_model
        reward, backend = faults.attempt(load, args, config) or (None, None)
        if dist.enabled:
            faults.check(dist.any(faults.failed))
        if evaluate:
            row_prompts, row_seeds = held_out_set(args.base)
            faults.phase = "the held-out evaluation before training"
            before, before_images = faults.attempt(evaluate_held_out, "before training", backend, reward,
                                                   row_prompts, row_seeds, config, lora=False) or (None, None)
        if dist.enabled:      # rank 0's evaluation outcome reaches every rank before the Trainer's first collective
            faults.check(dist.any(faults.failed))
    except KeyboardInterrupt:
        print(f"interrupted before training started: nothing to keep; run the same command again to start "
              f"over in {args.out}", file=sys.stderr)
        return 130
    except RankFailed as failure:
        if failure.__cause__ is not None and not isinstance(failure.__cause__, (RewardServerError, LoadRefused)):
            traceback.print_exception(failure.__cause__, file=sys.stderr)
        print(f"error: {failure}", file=sys.stderr)
        return 2
    printer = ProgressPrinter(config.epochs, enabled=dist.is_main)
    trainer = Trainer(backend, reward, prompts, config, out_dir=args.out, callback=printer, distributed=dist)
    if held_out is not None:
        from ..heldout import HeldOutMonitor
        trainer.held_out = HeldOutMonitor(held_out, config)
    resume_from = getattr(checkpoint, "path", checkpoint)
    start = time.perf_counter()
    try:
        with stop_requests(trainer.stop_event, interrupt=dist.enabled, stop_file=args.stop_file):
            result = trainer.run(resume_from=resume_from)
    except RankFailed as failure:        # distributed: an error on some rank ended every rank (distributed/faults.py)
        printer.bar.close()
        cause = failure.__cause__          # on the rank that failed: its own error
        if cause is not None and not isinstance(cause, (RewardServerError, PromptTextError)):
            traceback.print_exception(cause, file=sys.stderr)
        print(f"error: {failure}", file=sys.stderr)
        return 2
    except (RewardServerError, PromptTextError) as error:   # mid-run: the reward server went away, the prompt file changed
        printer.bar.close()
        path = trainer.save_checkpoint(partial=True)
        print(f"error: {error}\ncheckpoint: {path} (fix that, then continue with --resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        printer.bar.close()
        print("interrupted: saving a checkpoint", file=sys.stderr)
        trainer.stop_event.set()
        path = trainer.save_checkpoint(partial=True)
        print(f"checkpoint: {path} (continue with --resume)", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - start
    if not dist.is_main:
        return 130 if result.stopped else 0
    if result.stopped:
        print(f"stopped after {result.epochs_done} finished epochs; checkpoint: {result.checkpoint_path} "
              "(continue with --resume)", file=sys.stderr)
        return 130
    reward_curve(trainer.metrics, title=f"{reward.name}: reward per epoch (mean ± std)").save(args.out / "reward_curve.png")
    print(f"trained {result.epochs_done} epochs in {elapsed:.0f} s; LoRA: {result.lora_path}")
    if evaluate:
        after, after_images = evaluate_held_out("after training", backend, reward, row_prompts, row_seeds, config)
        from ..world.demo_eval import (GUARD_REWARD, alignment_guard, captioned_grid, guard_line, held_out_record,
                                      summary_lines, write_json)
        if is_world_base(args.base):
            per_prompt = len(row_seeds) // len(set(row_prompts))
            grid = captioned_grid(list(dict.fromkeys(row_prompts)), per_prompt, before_images, after_images,
                                  before, after)
            (args.out / "train_prompts.txt").write_text("\n".join(prompts) + "\n")
        else:
            shown = grid_rows_shown(row_prompts)
            grid = comparison_grid([before_images[shown], after_images[shown]], ["before", "after"],
                                   [before[shown], after[shown]])
        grid.save(args.out / "before_after.png")
        record = held_out_record(row_prompts, row_seeds, before, after)
        record.update(held_out_reward_before=before.mean().item(), held_out_reward_after=after.mean().item())
        if is_world_base(args.base) and reward.name != GUARD_REWARD:
            record["alignment_guard"] = alignment_guard(row_prompts, row_seeds, before_images, after_images)
        write_json(args.out / "held_out.json", record)
    print(f"wrote {args.out}/metrics.jsonl, reward_curve.png" + (", before_after.png, held_out.json" if evaluate else ""))
    if evaluate:    # the last lines: the paired change on the held-out (for the world: unseen) prompts
        label = "unseen prompts" if is_world_base(args.base) else "held-out prompts"
        if "alignment_guard" in record:
            print(guard_line(record["alignment_guard"]))
        print("\n".join(summary_lines(record["summary"], label)))
    return 0


def is_world_base(base: Optional[str]) -> bool:
    from ..world.model import MODEL_NAME
    return base is not None and str(base).strip() == MODEL_NAME


def held_out_set(base: Optional[str]):
    """(row prompts, row seeds) of the before/after evaluation, every image with its own seed
    (evaluation.py): for the world model, unseen captions."""
    if is_world_base(base):
        from ..world.demo_eval import eval_rows
        return eval_rows()
    from ..evaluation import distinct_seed_rows
    return distinct_seed_rows(HELD_OUT_PROMPTS, HELD_OUT_IMAGES_PER_PROMPT, HELD_OUT_FIRST_SEED)


def grid_rows_shown(row_prompts: Sequence[str]) -> List[int]:
    """The rows before_after.png shows: the first GRID_IMAGES_PER_PROMPT images of each prompt."""
    seen: dict = {}
    shown = []
    for row, prompt in enumerate(row_prompts):
        seen[prompt] = seen.get(prompt, 0) + 1
        if seen[prompt] <= GRID_IMAGES_PER_PROMPT:
            shown.append(row)
    return shown


def evaluate_held_out(when: str, backend, reward, row_prompts, row_seeds, config: TrainConfig, lora: bool = True):
    """(rewards, images) of the before/after evaluation, with progress lines on stderr."""
    from ..evaluation import score_rows
    from ..progress import PhaseProgress

    batches = math.ceil(len(row_seeds) / config.sample_batch_size)
    progress = PhaseProgress(f"held-out evaluation {when} ({len(row_seeds)} images)", batches * config.steps,
                             unit="denoising steps")

    def on_step(done: int, total: int) -> None:
        progress.total = total
        progress.update(done)
    result = score_rows(backend, reward, row_prompts, row_seeds, config, lora=lora, progress=on_step)
    progress.finish()
    return result


def split_held_out(args, config: TrainConfig, prompts: Sequence[str]):
    """(training prompts, heldout.HeldOutSet or None) for --eval-every (see heldout.py)."""
    from ..heldout import held_out_split

    eval_file = read_prompts(args.eval_prompts_file, args.prompt_field) if args.eval_prompts_file else None
    if eval_file is not None and not config.eval_every:
        raise SystemExit("error: --eval-prompts-file needs --eval-every N (epochs between held-out evaluations)")
    try:
        return held_out_split(prompts, config, eval_file)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
