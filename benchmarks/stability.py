"""The paper's central claim in miniature: PRDP vs DDPO vs PRDP without the proximal clip.

On the embedded world (comfyui_prdp/world) each algorithm is trained at EQUAL compute (the same
prompts per epoch N, images per prompt B, steps T, updates K, so the same sampled images and the
same budget of UNet evaluations per epoch; the evaluations actually run are counted too) on

- a SMALL prompt set: a few training captions (the paper's small-scale regime), and
- a LARGE one: every training caption of the world (the large-scale regime),

and evaluated on UNSEEN prompts (held-out captions, fixed seeds) before training and every
`eval_every` epochs. Per run it records the unseen-prompt reward curve and collapse measures:
sample diversity across seeds, distance from the base model's samples on the same seeds,
caption retrieval by the alignment scorer, and pixel roughness (noise) against the base's.

Writes OUT/results.json (one row per run) and OUT/stability.png (curves per prompt-set size and
a grid of unseen-prompt samples per run). OUT defaults to runs/stability-<timestamp>.

    python benchmarks/stability.py [--quick] [--out DIR] [--seeds 0,1] [--learning-rate 0.02]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfyui_prdp.config import TrainConfig, preset  # noqa: E402
from comfyui_prdp.evaluation import sample_images  # noqa: E402
from comfyui_prdp.world.grammar import held_out_prompts, sample_prompts, train_prompts  # noqa: E402

#: algorithm label -> TrainConfig overrides. "prdp-noclip": a clip range so wide it never binds
#: (the log-ratios of these runs stay below 10; the recorded clip fraction shows it is 0)
ALGORITHMS: Dict[str, dict] = {"prdp": {}, "ddpo": {"algorithm": "ddpo"},
                               "prdp-noclip": {"clip_range": 1e6}}
PROMPT_SETS = ("small", "large")
SMALL_SET_SIZE = 4

#: the settings shared by every run (over the cpu-smoke preset); --quick shrinks them further
FULL = dict(epochs=16, updates_per_epoch=2, prompts_per_epoch=4, images_per_prompt=4, steps=8,
            beta=0.01, clip_range=0.05, learning_rate=0.02, width=32, height=32,
            eval_prompt_count=8, eval_seed_count=4, eval_every=2)
QUICK = dict(epochs=2, updates_per_epoch=2, prompts_per_epoch=2, images_per_prompt=2, steps=3,
             beta=0.01, clip_range=0.05, learning_rate=0.02, width=32, height=32,
             eval_prompt_count=2, eval_seed_count=2, eval_every=1)
EVAL_SEED_BASE = 1000


@dataclass
class UnseenSet:
    prompts: List[str]
    seeds: List[int]

    @property
    def row_prompts(self) -> List[str]:
        return [p for p in self.prompts for _ in self.seeds]


class EvaluationCounter:
    """Counts the latents the UNet evaluates (a CFG pair counts 2) through backend.predict_eps."""

    def __init__(self, backend):
        self.count = 0
        original = backend.predict_eps

        def counted(x, t, cond):
            self.count += int(x.shape[0])
            return original(x, t, cond)

        backend.predict_eps = counted


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/stability-<timestamp>)")
    parser.add_argument("--quick", action="store_true", help="CI-sized: tiny runs, a schema check in minutes")
    parser.add_argument("--seeds", default=None, help="comma-separated training seeds (default 0,1; --quick 0)")
    parser.add_argument("--preset", default="cpu-smoke", help="preset under the shared settings (default cpu-smoke)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--updates-per-epoch", type=int, default=None)
    parser.add_argument("--clip-range", type=float, default=None,
                        help="PRDP's log-ratio and DDPO's ratio clip (default 0.05; the paper's PRDP: 1e-6 small, "
                             "1e-4 large); prdp-noclip keeps its never-binding 1e6")
    parser.add_argument("--beta", type=float, default=None, help="PRDP's KL weight (default 0.01)")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS),
                        help=f"comma-separated subset of {', '.join(ALGORITHMS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: this model's tiny convolutions ran 6x faster on "
                             "one thread than on two on a shared 2-core machine)")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = "0" if args.quick else "0,1"
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give whole numbers separated by commas, e.g. 0,1")
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in args.algorithms if a not in ALGORITHMS]
    if unknown or not args.algorithms:
        parser.error(f"--algorithms {','.join(unknown) or '(none)'}: choose from {', '.join(ALGORITHMS)}")
    if not args.seeds:
        parser.error("--seeds is empty: give at least one seed, e.g. 0")
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} exists and is not empty; choose a new folder (nothing is overwritten)")
    return args


def settings(args) -> dict:
    chosen = dict(QUICK if args.quick else FULL)
    for name in ("epochs", "learning_rate", "updates_per_epoch", "clip_range", "beta"):
        if getattr(args, name) is not None:
            chosen[name] = getattr(args, name)
    return chosen


def train_config(chosen: dict, args, algorithm: str, seed: int) -> TrainConfig:
    training = {k: v for k, v in chosen.items() if not k.startswith("eval_")}
    return preset(args.preset, **{**training, **ALGORITHMS[algorithm]}, seed=seed,
                  sample_batch_size=16, train_batch_size=16)


def prompt_sets() -> Dict[str, List[str]]:
    every = train_prompts()
    return {"small": sample_prompts(every, SMALL_SET_SIZE, seed=0), "large": every}


def unseen_set(chosen: dict) -> UnseenSet:
    prompts = sample_prompts(held_out_prompts(), chosen["eval_prompt_count"], seed=0)
    return UnseenSet(prompts, [EVAL_SEED_BASE + i for i in range(chosen["eval_seed_count"])])


# ---------------------------------------------------------------- measures
def unseen_rewards(reward, images: torch.Tensor, unseen: UnseenSet) -> torch.Tensor:
    reward.prepare()
    try:
        return reward.score(images, unseen.row_prompts).double()
    finally:
        reward.offload()


def rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image root-mean-square pixel difference (images [n, H, W, 3] in 0..1)."""
    return (a.double() - b.double()).pow(2).flatten(1).mean(1).sqrt()


def seed_diversity(images: torch.Tensor, unseen: UnseenSet) -> float:
    """Mean RMS distance between two seeds' images of the same prompt (0: every seed draws the
    same picture, i.e. mode collapse), averaged over prompts."""
    per_prompt = images.view(len(unseen.prompts), len(unseen.seeds), *images.shape[1:])
    values = [rms(group[i:i + 1], group[j:j + 1]) for group in per_prompt
              for i in range(len(unseen.seeds)) for j in range(i + 1, len(unseen.seeds))]
    return torch.cat(values).mean().item()


def roughness(images: torch.Tensor) -> float:
    """Mean absolute difference of neighbouring pixels: rises when samples turn into noise."""
    x = images.double()
    return 0.5 * ((x[:, 1:] - x[:, :-1]).abs().mean() + (x[:, :, 1:] - x[:, :, :-1]).abs().mean()).item()


def retrieval_accuracy(reward, images: torch.Tensor, unseen: UnseenSet) -> float:
    """Fraction of images whose own caption scores highest among the unseen captions."""
    model = getattr(reward, "model", None)
    if model is None or len(unseen.prompts) < 2:
        return float("nan")
    n = len(images)
    with torch.no_grad():
        scores = torch.stack([model.similarity(images.float().clamp(0, 1), [caption] * n)
                              for caption in unseen.prompts], dim=1)      # [n, prompts]
    own = torch.tensor([i // len(unseen.seeds) for i in range(n)])
    return (scores.argmax(1) == own).double().mean().item()


def collapse_measures(reward, images: torch.Tensor, base_images: torch.Tensor, unseen: UnseenSet) -> dict:
    return {"seed_diversity": seed_diversity(images, unseen),
            "distance_from_base": rms(images, base_images).mean().item(),
            "retrieval_accuracy": retrieval_accuracy(reward, images, unseen),
            "roughness": roughness(images)}


# ---------------------------------------------------------------- one run
def run_one(components: dict, reward, prompts: List[str], unseen: UnseenSet, config: TrainConfig,
            eval_every: int, base: dict, device: str) -> dict:
    """Train one (algorithm, prompt set, seed) run; its row of results.json (and its samples)."""
    from comfyui_prdp.backends.diffusers_backend import DiffusersBackend
    from comfyui_prdp.trainer import Trainer
    from comfyui_prdp.world.model import MODEL_NAME

    torch.manual_seed(config.seed)          # the LoRA's initial weights, as the CLI does
    parts = dict(components, unet=copy.deepcopy(components["unet"]))   # a fresh LoRA on a fresh copy
    backend = DiffusersBackend.from_components(**parts, config=config, device=device, model_name=MODEL_NAME)
    counter = EvaluationCounter(backend)
    trainer = Trainer(backend, reward, prompts, config, estimate_cost=False)    # every evaluation counted trains
    curve = [{"epoch": 0, "unseen_reward": base["reward"].mean().item()}]
    training, diverged_at, images = [], None, base["images"]
    last_good = backend.lora_state_dict()
    start = time.perf_counter()
    for epoch in range(config.epochs):
        try:
            metrics = trainer.train_epoch(epoch)
        except (FloatingPointError, RuntimeError) as error:     # the model diverged: that is a result
            diverged_at = epoch + 1
            print(f"    diverged in epoch {epoch + 1}: {str(error).splitlines()[0]}", flush=True)
            backend.load_lora_state_dict(last_good)
            break
        trainer.epoch = epoch + 1
        last_good = {k: v.clone() for k, v in backend.lora_state_dict().items()}
        training.append({"epoch": epoch + 1, "train_reward": metrics["reward_mean"], "kl": metrics["kl"],
                         "clip_frac": metrics["clip_frac"]})
        if (epoch + 1) % eval_every == 0 or epoch + 1 == config.epochs:
            evaluations = counter.count
            images = sample_images(backend, unseen.prompts, unseen.seeds, config)
            counter.count = evaluations            # evaluation is not training compute
            after = unseen_rewards(reward, images, unseen)
            curve.append({"epoch": epoch + 1, "unseen_reward": after.mean().item()})
    seconds = time.perf_counter() - start
    evaluations = counter.count
    if curve[-1]["epoch"] != len(training):    # a diverged run: its last finite state
        images = sample_images(backend, unseen.prompts, unseen.seeds, config)
        after = unseen_rewards(reward, images, unseen)
        curve.append({"epoch": len(training), "unseen_reward": after.mean().item()})
    before_measures = base["measures"]
    row = {
        "unseen_reward_before": base["reward"].mean().item(),
        "unseen_reward_after": after.mean().item(),
        "unseen_gain": (after - base["reward"]).mean().item(),
        "unseen_paired_t": paired_t(after - base["reward"]),
        "collapse_before": before_measures,
        "collapse_after": collapse_measures(reward, images, base["images"], unseen),
        "curve": curve,
        "training": training,
        "diverged_at_epoch": diverged_at,
        "epochs_done": len(training),
        "sampled_images": len(training) * config.prompts_per_epoch * config.images_per_prompt,
        "unet_evaluations": evaluations,
        "unet_evaluation_budget": len(training) * sum(config.model_evaluations_per_epoch().values()),
        "seconds": round(seconds, 1),
    }
    return {"row": row, "images": images}


def paired_t(diff: torch.Tensor) -> float:
    diff = diff.double()
    if len(diff) < 2 or diff.std().item() == 0:
        return 0.0
    return diff.mean().item() / (diff.std().item() / math.sqrt(len(diff)))


def check_finite(value, where: str = "results") -> None:
    """Every number of a results row must be finite before it is written (None is allowed)."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_finite(item, f"{where}[{index}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} = {value}: not finite; the benchmark refuses to write it")


def write_json(path: Path, record: dict) -> None:
    from comfyui_prdp.lora.files import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    chosen = settings(args)
    out = args.out or Path("runs") / f"stability-{time.strftime('%Y%m%d-%H%M%S')}"
    sets, unseen = prompt_sets(), unseen_set(chosen)
    for algorithm in args.algorithms:          # every configuration is checked before anything loads
        train_config(chosen, args, algorithm, args.seeds[0])
    out.mkdir(parents=True, exist_ok=True)

    from comfyui_prdp.models.loading import load_components
    from comfyui_prdp.rewards import create_reward
    from stability_figure import stability_figure

    components, _ = load_components("embedded-world")
    reward = create_reward("world-alignment")
    base = base_samples(components, reward, unseen, train_config(chosen, args, "prdp", 0), args.device)
    rows, samples = [], []
    total_start = time.perf_counter()
    runs = [(seed, size, algorithm) for seed in args.seeds for size in PROMPT_SETS for algorithm in args.algorithms]
    for seed, size, algorithm in runs:
        config = train_config(chosen, args, algorithm, seed)
        print(f"{algorithm:12s} {size:5s} ({len(sets[size])} prompts) seed {seed}", flush=True)
        result = run_one(components, reward, sets[size], unseen, config, chosen["eval_every"], base, args.device)
        row = {"algorithm": algorithm, "prompt_set": size, "prompt_set_size": len(sets[size]), "seed": seed,
               **result["row"]}
        check_finite(row, f"{algorithm}/{size}/seed {seed}")
        rows.append(row)
        samples.append((f"{algorithm} / {size} / seed {seed}", result["images"]))
        after = row["collapse_after"]
        print(f"    unseen reward {row['unseen_reward_before']:+.4f} -> {row['unseen_reward_after']:+.4f} "
              f"(t {row['unseen_paired_t']:+.2f}); diversity {after['seed_diversity']:.3f} "
              f"(base {base['measures']['seed_diversity']:.3f}); from base {after['distance_from_base']:.3f}; "
              f"retrieval {after['retrieval_accuracy']:.2f}; {row['seconds']:.0f} s", flush=True)
        # rewritten after every run, so an interrupted benchmark keeps the runs it finished
        record = results_record(args, chosen, sets, unseen, base, rows, time.perf_counter() - total_start,
                                complete=len(rows) == len(runs))
        check_finite(record)
        write_json(out / "results.json", record)
        stability_figure(rows, samples, base["images"], unseen).save(out / "stability.png")
    print("\n".join(summary_table(rows)))
    print(f"wrote {out}/results.json and {out}/stability.png")
    return 0


def summary_table(rows: List[dict]) -> List[str]:
    """A markdown table of the runs (docs/research.md's "Stability in miniature" has one)."""
    lines = ["| algorithm | prompts | seed | unseen reward before -> after | paired t | seed diversity | "
             "distance from base | retrieval | roughness | diverged |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        after = row["collapse_after"]
        lines.append(f"| {row['algorithm']} | {row['prompt_set_size']} | {row['seed']} | "
                     f"{row['unseen_reward_before']:.4f} -> {row['unseen_reward_after']:.4f} | "
                     f"{row['unseen_paired_t']:+.2f} | {after['seed_diversity']:.3f} | "
                     f"{after['distance_from_base']:.3f} | {after['retrieval_accuracy']:.2f} | "
                     f"{after['roughness']:.3f} | {row['diverged_at_epoch'] or 'no'} |")
    return lines


def results_record(args, chosen: dict, sets: Dict[str, List[str]], unseen: UnseenSet, base: dict,
                   rows: List[dict], seconds: float, complete: bool) -> dict:
    return {
        "complete": complete,
        "settings": {**chosen, "preset": args.preset, "quick": args.quick, "seeds": args.seeds,
                     "clip_range_by_algorithm": {a: train_config(chosen, args, a, 0).clip_range
                                                 for a in args.algorithms}},
        "train_config": {a: train_config(chosen, args, a, args.seeds[0]).to_dict() for a in args.algorithms},
        "prompt_sets": {size: {"size": len(sets[size]), "first": sets[size][:SMALL_SET_SIZE]} for size in sets},
        "unseen": {"prompts": unseen.prompts, "seeds": unseen.seeds},
        "base": {"unseen_reward": base["reward"].mean().item(), **base["measures"]},
        "rows": rows,
        "seconds": round(seconds, 1),
    }


def base_samples(components: dict, reward, unseen: UnseenSet, config: TrainConfig, device: str) -> dict:
    """The base model's unseen-prompt images, rewards and collapse measures (LoRA disabled)."""
    from comfyui_prdp.backends.diffusers_backend import DiffusersBackend

    parts = dict(components, unet=copy.deepcopy(components["unet"]))
    backend = DiffusersBackend.from_components(**parts, config=config, device=device)
    images = sample_images(backend, unseen.prompts, unseen.seeds, config, lora=False)
    return {"images": images, "reward": unseen_rewards(reward, images, unseen),
            "measures": collapse_measures(reward, images, images, unseen)}


if __name__ == "__main__":
    sys.exit(main())
