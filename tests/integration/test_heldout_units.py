"""The held-out statistic counts independent units (evaluation.paired_statistics): images that
share a seed start from the same noise, and with a model that barely reads its prompt they are
near-duplicates, so they count once. The evaluations give every image its own seed, and
held_out.json, best.json and the CLI lines say what n is.

The references here are written out with plain Python lists (the textbook paired t over the
per-seed means), not with the function under test."""
import json
import math

import pytest
import torch

from comfyui_prdp import cli
from comfyui_prdp.cli.run import held_out_set
from comfyui_prdp.evaluation import distinct_seed_rows, grid_rows, paired_statistics
from comfyui_prdp.world.demo_eval import eval_rows
from test_cli_outdir import run_cli, toy  # noqa: F401  (fixture)


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


def textbook_t(before, after):
    diff = [a - b for a, b in zip(after, before)]
    n = len(diff)
    mean = sum(diff) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1))
    return mean / (sd / math.sqrt(n))


def near_duplicate_grid(prompts=4, seeds=(1000, 1001, 1002, 1003)):
    """Rewards of prompts x seeds images (prompt-major) where the images of one seed differ by
    1e-4 across prompts (before: -3.842, -3.819, ... per seed, as measured on the texture model)."""
    seed_before = [-3.842, -3.819, -3.822, -3.829]
    seed_gain = [0.030, 0.004, 0.021, 0.012]
    generator = torch.Generator().manual_seed(0)
    jitter = lambda: 1e-4 * torch.randn((), generator=generator).item()  # noqa: E731
    before = [seed_before[s] + jitter() for _ in range(prompts) for s in range(len(seeds))]
    after = [b + seed_gain[s % len(seeds)] + jitter() for s, b in enumerate(before)]
    return before, after, grid_rows([f"p{i}" for i in range(prompts)], seeds)[1], seed_before, seed_gain


def test_near_duplicate_images_of_one_seed_do_not_raise_n_or_t():
    before, after, row_seeds, _, _ = near_duplicate_grid()
    stats = paired_statistics(f64(before), f64(after), row_seeds)
    assert stats["images"] == 16 and stats["n"] == 4 and stats["degrees_of_freedom"] == 3
    assert stats["unit"] == "seed (4 images sharing it averaged)"
    means = lambda values: [sum(values[s::4]) / 4 for s in range(4)]  # noqa: E731  (per seed)
    assert stats["paired_t"] == pytest.approx(textbook_t(means(before), means(after)), rel=1e-9)
    # the 16 images taken as independent would double t: the inflation this guards against
    assert textbook_t(before, after) > 1.9 * stats["paired_t"]
    # four more near-duplicate prompts add images, not evidence
    more = near_duplicate_grid(prompts=8)
    stats8 = paired_statistics(f64(more[0]), f64(more[1]), more[2])
    assert stats8["n"] == 4 and stats8["paired_t"] == pytest.approx(stats["paired_t"], rel=0.05)


def test_images_with_their_own_seeds_are_each_a_unit():
    before = [0.1, 0.4, 0.2, 0.5, 0.3, 0.35]
    after = [0.2, 0.45, 0.1, 0.7, 0.5, 0.3]
    _, seeds = distinct_seed_rows(["a", "b"], 3, 1000)
    stats = paired_statistics(f64(before), f64(after), seeds)
    assert stats["n"] == stats["images"] == 6 and stats["unit"] == "seed"
    assert stats["paired_t"] == pytest.approx(textbook_t(before, after), rel=1e-9)
    with pytest.raises(ValueError, match="one of each per image"):
        paired_statistics(f64(before), f64(after), seeds[:5])


def test_every_evaluation_gives_each_image_its_own_seed():
    prompts, seeds = held_out_set(None)              # the texture demo's before/after evaluation
    assert len(prompts) == len(seeds) == 64 and len(set(seeds)) == 64 and len(set(prompts)) == 4
    prompts, seeds = eval_rows()                         # the world demo's unseen captions
    assert len(set(seeds)) == len(seeds) == len(prompts) >= 32
    # a prompt's seeds do not depend on how many images the other prompts get
    assert distinct_seed_rows(["a", "b"], 2, 7)[1] == [7, 8, 71, 72]
    assert distinct_seed_rows(["a", "b"], 3, 7)[1] == [7, 8, 9, 71, 72, 73]
    with pytest.raises(ValueError, match="give 1 to 64"):
        distinct_seed_rows(["a"], 65, 0)


def test_held_out_json_and_the_last_lines_state_n_and_the_unit(tmp_path, toy, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert run_cli(out, evaluate=True) == 0
    captured = capsys.readouterr()
    record = json.loads((out / "held_out.json").read_text())
    summary = record["summary"]
    images = len(cli.HELD_OUT_PROMPTS) * cli.HELD_OUT_IMAGES_PER_PROMPT
    assert summary["n"] == summary["images"] == len(set(record["seeds"])) == images and summary["unit"] == "seed"
    assert summary["paired_t"] == pytest.approx(textbook_t(record["rewards_before"], record["rewards_after"]),
                                                rel=1e-9)
    lines = captured.out.strip().splitlines()
    assert lines[-2].startswith(f"held-out prompts ({images} images, the same seeds before and after)")
    assert lines[-1].startswith(f"paired t = {summary['paired_t']:.2f} over n = {images} images, each with its "
                                f"own seed ({images - 1} df)")
